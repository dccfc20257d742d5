"""The experiment's report: sanity checks first (the run is marked invalid where one fails), then attribute accuracy
per arm with 95% intervals over seeds, the share of the floor-to-ceiling gap each arm closes, wall time per step,
and a labelled image grid (rows: prompts, columns: arms, one seed).

Accuracy per seed is the mean over that seed's prompts; the interval is Student's t over the seeds (the same
seeds for every arm). "Beats the floor" means the paired difference with the floor (same prompts and seeds)
has a 95% interval above zero.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

from adapter.eval_report import CSS, GridRow, grid_html, grid_image
from adapter.experiment.world import ATTRIBUTES, chance
from surd.report import esc
from surd.shards import atomic_write_bytes

CATEGORIES = ("seen", "held-out")
METRICS = (*ATTRIBUTES, "all")  # each attribute, then their mean
JUDGE_MIN, CEILING_MIN, FLOOR_MARGIN = 0.95, 0.8, 0.2
CHECKED = ("colour", "position")  # the attributes whose ceiling and floor gate the run
GRID_PROMPTS = 6  # per category
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}
RESULTS_START, RESULTS_END = "<!-- experiment results: start -->", "<!-- experiment results: end -->"


def t95(df: int) -> float:
    """Student's t quantile of a two-sided 95% interval (between tabulated degrees of freedom: the larger one)."""
    if df < 1:
        return math.nan
    return _T95[max(k for k in _T95 if k <= df)] if df <= max(_T95) else 1.96


def interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and half-width of its 95% interval (None with one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, t95(len(values) - 1) * sd / math.sqrt(len(values))


def arm_label(arm: str, kinds: list[str]) -> str:
    labels = {"base": "floor: base + narrative", "keyword": "ceiling: base + keyword",
              "finetune": "fine-tune control + narrative", "llm-expanded": "base + LLM-expanded narrative"}
    return labels.get(arm) or (f"adapter `{arm}` + narrative" if arm in kinds else arm)


def per_seed(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[int, float]]:
    """(category, arm, metric) -> seed -> accuracy over that seed's prompts."""
    sums: dict[tuple[str, str, str, int], list[float]] = defaultdict(list)
    for r in records:
        if r.get("attribute_accuracy") is None:
            continue
        for metric in METRICS:
            value = r["attribute_accuracy"] if metric == "all" else r[f"acc_{metric}"]
            sums[(r["category"], r["arm"], metric, r["seed"])].append(value)
    out: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for (category, arm, metric, seed), values in sums.items():
        out[(category, arm, metric)][seed] = sum(values) / len(values)
    return out


def summarise(records: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Per category and arm: mean and interval per metric; paired difference with the floor and the ceiling."""
    seeds = per_seed(records)
    table: dict[str, Any] = {}
    for category in CATEGORIES:
        rows: dict[str, Any] = {}
        for arm in arms:
            if (category, arm, "all") not in seeds:
                continue
            entry: dict[str, Any] = {}
            for metric in METRICS:
                mean, half = interval(list(seeds[(category, arm, metric)].values()))
                entry[metric] = {"mean": mean, "ci95": half}
            for ref in ("base", "keyword"):
                mine, theirs = seeds[(category, arm, "all")], seeds.get((category, ref, "all"), {})
                common = sorted(set(mine) & set(theirs))
                if arm != ref and common:
                    mean, half = interval([mine[s] - theirs[s] for s in common])
                    entry[f"vs_{ref}"] = {"mean": mean, "ci95": half}
            rows[arm] = entry
        floor, ceiling = rows.get("base"), rows.get("keyword")
        if floor and ceiling:
            gap = ceiling["all"]["mean"] - floor["all"]["mean"]
            for entry in rows.values():
                entry["gap_closed"] = (entry["all"]["mean"] - floor["all"]["mean"]) / gap if gap > 0 else None
        table[category] = rows
    return table


def sanity_checks(summary: dict[str, Any], judged: dict[str, Any], arms: list[str],
                  images: dict[str, int]) -> list[dict[str, Any]]:
    """Each check: what, the value, the bar, passed. Read before any arm."""
    checks = []
    for where, accuracies in (("unseen renders", judged["renders"]),
                              ("unseen renders of held-out combinations", judged["held_out_combinations"])):
        worst = min(accuracies, key=accuracies.get)
        checks.append({"check": f"judge accuracy on {where} (lowest attribute: {worst})",
                       "value": accuracies[worst], "bar": f">= {JUDGE_MIN}", "passed": accuracies[worst] >= JUDGE_MIN})
    for category in CATEGORIES:
        rows = summary.get(category, {})
        for attribute in CHECKED:
            ceiling = rows.get("keyword", {}).get(attribute, {}).get("mean")
            floor = rows.get("base", {}).get(attribute, {}).get("mean")
            checks.append({"check": f"ceiling {attribute} ({category})", "value": ceiling,
                           "bar": f">= {CEILING_MIN}", "passed": ceiling is not None and ceiling >= CEILING_MIN})
            near = chance(attribute) + FLOOR_MARGIN
            checks.append({"check": f"floor {attribute} near chance ({category}; chance {chance(attribute):.2f})",
                           "value": floor, "bar": f"<= {near:.2f}", "passed": floor is not None and floor <= near})
    expected = max(images.values()) if images else 0
    missing = [arm for arm in arms if images.get(arm, 0) != expected]
    checks.append({"check": "every arm made every image (prompts x seeds)", "value": expected,
                   "bar": "all arms equal", "passed": bool(expected) and not missing,
                   "detail": ", ".join(missing)})
    return checks


def machine() -> dict[str, Any]:
    """Where and when this ran: for the numbers' context (the load average says how shared the CPU was)."""
    import torch

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "platform": platform.platform(terse=True), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 1) for x in os.getloadavg()]}


# ---------------------------------------------------------------- text


def _pct(value: float | None, half: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" + (f" ± {100 * half:.1f}" if half is not None else "")


def verdict(entry: dict[str, Any]) -> str:
    """Where an arm stands: against the floor and the ceiling, by its paired intervals."""
    floor, ceiling = entry.get("vs_base"), entry.get("vs_keyword")
    if floor is None:
        return "(the floor)"
    if ceiling is None:
        return "(the ceiling)"
    lower = floor["mean"] - (floor["ci95"] or 0)
    if lower <= 0:
        return "does not beat the floor"
    below = ceiling["mean"] + (ceiling["ci95"] or 0) < 0
    return "beats the floor, below the ceiling" if below else "beats the floor, not distinguishable from the ceiling"


def tables(result: dict[str, Any]) -> dict[str, list[list[str]]]:
    """Header + rows of every table the report shows (shared by Markdown and HTML)."""
    kinds, summary = result["kinds"], result["summary"]
    out = {"sanity checks": [["check", "value", "bar", "passed"]] + [
        [c["check"] + (f" (missing: {c['detail']})" if c.get("detail") else ""),
         f"{c['value']:.3f}" if isinstance(c["value"], float) else str(c["value"]), c["bar"],
         "yes" if c["passed"] else "NO"] for c in result["checks"]]}
    for category in CATEGORIES:
        rows = [["arm", *(f"{m} %" for m in ATTRIBUTES), "all attributes %", "Δ vs floor (pt)", "gap closed",
                 "verdict"]]
        for arm, entry in summary.get(category, {}).items():
            vs = entry.get("vs_base")
            rows.append([arm_label(arm, kinds), *(_pct(entry[m]["mean"], entry[m]["ci95"]) for m in METRICS),
                         _pct(vs["mean"], vs["ci95"]) if vs else "–",
                         f"{entry['gap_closed']:.2f}" if entry.get("gap_closed") is not None else "–", verdict(entry)])
        out[f"attribute accuracy, {category} combinations"] = rows
    out["wall time per step"] = [["step", "seconds", "from cache"]] + [
        [name, f"{t['seconds']:.0f}", "yes" if t["cached"] else ""] for name, t in result["times"].items()]
    return out


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    status = "VALID" if result["valid"] else "INVALID (a sanity check failed: read no arm)"
    lines = [f"Run: `surd experiment shapes` ({s['name']}, {s['seeds']} seeds) — **{status}**", "",
             f"- {m['date']}, commit `{m['commit']}`, {m['platform']}, {m['cpus']} CPUs, torch threads "
             f"{m['torch_threads']}, load average at the end {m['load_average']} (1/5/15 min)",
             f"- total wall time {sum(t['seconds'] for t in result['times'].values()) / 60:.1f} min "
             f"({sum(not t['cached'] for t in result['times'].values())} steps run, the rest from the cache)",
             "- accuracy in %, mean over seeds ± 95% interval (t over seeds); Δ vs floor is paired (same prompts "
             "and seeds); gap closed = (arm − floor) / (ceiling − floor) on all attributes"]
    for title, table in tables(result).items():
        lines += ["", f"**{title[0].upper() + title[1:]}**", ""]
        for n, row in enumerate(table):
            lines.append("| " + " | ".join(row) + " |")
            if n == 0:
                lines.append("|" + "|".join("---" for _ in row) + "|")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the image grid


def grid_rows(records: list[dict[str, Any]], arms: list[str], exp: Path) -> list[GridRow]:
    """Seed 0 of the first prompts of each category: one row per prompt, one column per arm."""
    by_item: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        if r["seed"] == 0:
            by_item[(r["category"], r["item_id"])][r["arm"]] = r
    rows = []
    for category in CATEGORIES:
        items = sorted(k for k in by_item if k[0] == category)[:GRID_PROMPTS]
        for key in items:
            cells = by_item[key]
            first = next(iter(cells.values()))
            images = [(exp / "eval" / cells[a]["image"]).read_bytes() if a in cells else None for a in arms]
            captions = [("✓ " if cells[a]["reading_ok"] else "✗ ") + esc(cells[a]["reading"] or "") if a in cells
                        else "" for a in arms]
            truth = " ".join(json.loads(first["attributes"]).values())
            rows.append(GridRow(f"[{category}] {first['prompt']}", images, captions,
                                note=f'<span class="muted">truth: {esc(truth)}<br>keyword: '
                                     f'{esc(first["keyword_prompt"])}</span>'))
    return rows


def html(result: dict[str, Any], rows: list[GridRow], arms: list[str]) -> str:
    status = "VALID" if result["valid"] else "INVALID: a sanity check failed, no arm can be read"
    body = [f"<h1>surd experiment: shapes</h1><p><b class='{'ok' if result['valid'] else 'bad'}'>{esc(status)}</b>"
            f"</p><p class='muted'>{esc(json.dumps(result['machine']))}</p>"]
    for title, table in tables(result).items():
        head = "".join(f"<th>{esc(h)}</th>" for h in table[0])
        cells = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in table[1:])
        body.append(f"<h2>{esc(title[0].upper() + title[1:])}</h2><table><tr>{head}</tr>{cells}</table>")
    body.append("<h2>Images (seed 0; the judge's reading under each)</h2>")
    body.append(grid_html([arm_label(a, result["kinds"]) for a in arms], rows, small=True))
    body.append(f"<h2>Settings</h2><pre>{esc(json.dumps(result['settings'], indent=1))}</pre>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>surd experiment: shapes</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(exp: Path, run: dict[str, Any], docs: Path | None = None) -> dict[str, Any]:
    """EXP/report.html, report.md, grid.png and result.json; with `docs`, its results block and a grid beside it."""
    import pyarrow.parquet as pq

    records = pq.read_table(exp / "eval" / "scores.parquet").to_pylist()
    arms = list(dict.fromkeys(a["name"] for a in run["eval"]["arms"]))
    order = ["base", "keyword", *run["kinds"], "finetune", "llm-expanded"]
    arms = [a for a in order if a in arms] + [a for a in arms if a not in order]
    summary = summarise(records, arms)
    images = {arm: sum(r["arm"] == arm for r in records) for arm in arms}
    checks = sanity_checks(summary, run["judge"], arms, images)
    result = {**{k: run[k] for k in ("settings", "kinds", "times", "judge", "base", "splits")},
              "machine": machine(), "summary": summary, "checks": checks,
              "valid": all(c["passed"] for c in checks), "arms": arms, "images": images}
    rows = grid_rows(records, arms, exp)
    atomic_write_bytes(exp / "report.html", html(result, rows, arms).encode())
    text = markdown(result)
    atomic_write_bytes(exp / "report.md", text.encode())
    grid = grid_image([arm_label(a, run["kinds"]).replace("`", "") for a in arms], rows)
    grid.save(exp / "grid.png")
    atomic_write_bytes(exp / "result.json", json.dumps(result, indent=1, default=str).encode())
    if docs is not None:
        write_docs(docs, text, grid)
    return result


def write_docs(docs: Path, text: str, grid: Any) -> None:
    """Replace the results block of `docs` (between its markers) and write the grid beside it."""
    from surd.errors import SurdError

    page = docs.read_text() if docs.is_file() else ""
    if RESULTS_START not in page or RESULTS_END not in page:
        raise SurdError(f"--docs {docs}: no '{RESULTS_START}' ... '{RESULTS_END}' block to fill")
    picture = docs.with_name(docs.stem + "-grid.png")
    grid.save(picture)
    block = f"{RESULTS_START}\n{text}\n![Images: rows are prompts, columns are arms]({picture.name})\n{RESULTS_END}"
    head, rest = page.split(RESULTS_START, 1)
    atomic_write_bytes(docs, (head + block + rest.split(RESULTS_END, 1)[1]).encode())
