"""Summaries and reports of `surd eval`: per-category tables (JSON, Markdown) and a side-by-side HTML page.

Comparisons with the base model are paired: each arm's image is compared with the base image of the
same prompt and seed (same starting noise), so the deltas measure the arm, not the seed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from surd.report import esc, thumbnail
from surd.shards import atomic_write_bytes

ALL_PROBES = "all probes"
HTML_ITEMS_PER_CATEGORY = 40  # keeps the page a few MB; every image is still in scores.parquet and images/
METRICS = ("clip_narrative", "clip_keyword", "probe_accuracy", "p_correct")


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _ci95(values: list[float]) -> float | None:
    """Half-width of a normal-approximation 95% interval of the mean."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return round(1.96 * math.sqrt(var / len(values)), 4)


def _metric(record: dict[str, Any], name: str) -> float | None:
    if name == "probe_accuracy":
        value = record.get("probe_correct")
        return None if value is None else float(value)
    return record.get(name)


def _summarise_group(records: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    by_arm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_arm[record["arm"]].append(record)
    summary: dict[str, Any] = {
        "prompts": len({(r["category"], r["item_id"]) for r in records}),
        "arms": {},
        "vs_base": {},
    }
    for arm in arms:
        rows = by_arm.get(arm, [])
        entry: dict[str, Any] = {"images": len(rows)}
        for name in METRICS:
            entry[name] = _mean([v for r in rows if (v := _metric(r, name)) is not None])
        summary["arms"][arm] = entry
    base = {(r["category"], r["item_id"], r["seed"]): r for r in by_arm.get("base", [])}
    for arm in arms:
        if arm == "base":
            continue
        pairs = [(r, base[k]) for r in by_arm.get(arm, []) if (k := (r["category"], r["item_id"], r["seed"])) in base]
        entry = {"pairs": len(pairs)}
        for name in ("clip_narrative", "clip_keyword", "probe_accuracy"):
            deltas = [a - b for r, s in pairs
                      if (a := _metric(r, name)) is not None and (b := _metric(s, name)) is not None]
            entry[f"{name}_delta"] = _mean(deltas)
            entry[f"{name}_delta_ci95"] = _ci95(deltas)
        narrative = [(r["clip_narrative"], s["clip_narrative"]) for r, s in pairs]
        entry["win_rate"] = _mean([float(a > b) for a, b in narrative])  # share of pairs where the arm scores higher
        summary["vs_base"][arm] = entry
    return summary


def summarise(records: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Per category (`surd`, each probe set, and all probes together): per-arm means and paired deltas vs base."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record["category"]].append(record)
    probe_categories = [c for c in groups if c != "surd"]
    if len(probe_categories) > 1:
        groups[ALL_PROBES] = [r for c in probe_categories for r in groups[c]]
    return {category: _summarise_group(rows, arms) for category, rows in groups.items()}


# ---------------------------------------------------------------- Markdown


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if pct else f"{value:.4f}"


def _delta(entry: dict[str, Any], name: str, pct: bool = False) -> str:
    value, ci = entry.get(f"{name}_delta"), entry.get(f"{name}_delta_ci95")
    if value is None:
        return "–"
    scale, unit = (100, " pt") if pct else (1, "")
    text = f"{scale * value:+.{1 if pct else 4}f}{unit}"
    return text + (f" ± {scale * ci:.{1 if pct else 4}f}" if ci is not None else "")


def category_table(summary: dict[str, Any]) -> list[list[str]]:
    """Header plus one row per arm: the table both the Markdown and the HTML reports show."""
    rows = [["arm", "images", "CLIP narrative", "CLIP keyword", "probe accuracy", "p(correct)",
             "Δ CLIP narrative vs base (95% CI)", "Δ accuracy vs base", "win rate vs base"]]
    for arm, entry in summary["arms"].items():
        versus = summary["vs_base"].get(arm, {})
        rows.append([arm, str(entry["images"]), _fmt(entry["clip_narrative"]), _fmt(entry["clip_keyword"]),
                     _fmt(entry["probe_accuracy"], pct=True), _fmt(entry["p_correct"]),
                     _delta(versus, "clip_narrative") if versus else "(reference)",
                     _delta(versus, "probe_accuracy", pct=True) if versus else "",
                     _fmt(versus.get("win_rate"), pct=True) if versus else ""])
    return rows


def markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    images = results["images"]
    lines = [
        "# SUR-adapter evaluation", "",
        f"- base: `{c['base']}`; adapter: `{c['adapter']}`; CLIP: `{results['clip_model']}`",
        f"- seeds {', '.join(map(str, c['seeds']))}; {c['steps']} steps; guidance {c['guidance_scale']}",
        f"- images: {images['total']} ({images['generated']} generated this run, {images['reused']} reused)",
        "- CLIP scores are image–text cosine similarities; probe accuracy is CLIP zero-shot over each probe's "
        "alternatives; Δ columns are paired with the base image of the same prompt and seed.",
    ]
    for category, summary in results["categories"].items():
        lines += ["", f"## {category} ({summary['prompts']} prompts)", ""]
        table = category_table(summary)
        keep = [i for i, head in enumerate(table[0]) if any(row[i] not in ("–", "") for row in table[1:])]
        for n, row in enumerate(table):
            lines.append("| " + " | ".join(row[i] for i in keep) + " |")
            if n == 0:
                lines.append("|" + "|".join("---" for _ in keep) + "|")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#222;background:#fafafa}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{padding:.25rem .6rem;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}.muted{color:#777;font-size:.85rem}
.item{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6rem;margin:.8rem 0;overflow-wrap:anywhere}
.row{display:flex;gap:.6rem;flex-wrap:wrap;margin:.4rem 0}figure{margin:0;font-size:.8rem;text-align:center}
figure img{display:block;width:192px;height:auto;image-rendering:auto}.ok{color:#2e7d32}.bad{color:#c62828}
"""


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(record: dict[str, Any], out: Path) -> str:
    caption = f"{esc(record['arm'])} · seed {record['seed']} · CLIP {record['clip_narrative']:.3f}"
    if record.get("probe_choice") is not None:
        mark = "ok" if record["probe_correct"] else "bad"
        caption += f'<br><span class="{mark}">{"✓" if record["probe_correct"] else "✗"} ' \
                   f'{esc(record["alternatives"][record["probe_choice"]])}</span>'
    if record["generation_prompt"] != record["prompt"]:
        caption += f'<br><span class="muted" title="{esc(record["generation_prompt"])}">(expanded prompt)</span>'
    return f'<figure><img src="{thumbnail((out / record["image"]).read_bytes())}" alt="{esc(record["arm"])}">' \
           f"<figcaption>{caption}</figcaption></figure>"


def _item(records: list[dict[str, Any]], arms: list[str], out: Path) -> str:
    first = records[0]
    parts = [f'<div class="item"><p><b>{esc(first["prompt"])}</b> '
             f'<span class="muted">{esc(first["item_id"])}</span></p>']
    if first.get("keyword_prompt"):
        parts.append(f'<p class="muted">keyword prompt: {esc(first["keyword_prompt"])}</p>')
    if first.get("alternatives"):
        answer = first["alternatives"][first["answer"]]
        parts.append(f'<p class="muted">answer: {esc(answer)} · alternatives: '
                     f'{esc(" / ".join(first["alternatives"]))}</p>')
    by_seed: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for record in records:
        by_seed[record["seed"]][record["arm"]] = record
    for seed in sorted(by_seed):
        figures = [_figure(by_seed[seed][arm], out) for arm in arms if arm in by_seed[seed]]
        parts.append('<div class="row">' + "".join(figures) + "</div>")
    return "".join(parts) + "</div>"


def html_page(results: dict[str, Any], records: list[dict[str, Any]], out: Path) -> str:
    arms = [arm["name"] for arm in results["arms"]]
    by_item: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_item[record["category"]][record["item_id"]].append(record)
    c = results["config"]
    body = [f"<h1>SUR-adapter evaluation</h1><p>base <code>{esc(c['base'])}</code> · adapter "
            f"<code>{esc(c['adapter'])}</code> · CLIP <code>{esc(results['clip_model'])}</code> · seeds "
            f"{esc(', '.join(map(str, c['seeds'])))} · {esc(c['steps'])} steps · guidance {esc(c['guidance_scale'])}"
            f"</p><p class='muted'>Images of one row share the prompt and the seed (the same starting noise).</p>"]
    for category, summary in results["categories"].items():
        body.append(f"<h2>{esc(category)} ({summary['prompts']} prompts)</h2>{_html_table(category_table(summary))}")
        items = list(by_item.get(category, {}).values())
        for item_records in items[:HTML_ITEMS_PER_CATEGORY]:
            body.append(_item(item_records, arms, out))
        if len(items) > HTML_ITEMS_PER_CATEGORY:
            body.append(f'<p class="muted">{len(items) - HTML_ITEMS_PER_CATEGORY} more prompts: see scores.parquet '
                        "and images/</p>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>SUR-adapter evaluation</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write_reports(results: dict[str, Any], records: list[dict[str, Any]], out: Path) -> None:
    """results.md and report.html beside results.json (each written atomically)."""
    atomic_write_bytes(out / "results.md", markdown(results).encode())
    atomic_write_bytes(out / "report.html", html_page(results, records, out).encode())
