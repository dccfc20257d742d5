"""Summaries and reports of `surd eval`: per-category tables (JSON, Markdown) and a side-by-side HTML page.

Comparisons with the base model are paired: each arm's image is compared with the base image of the
same prompt, seed and guidance scale (same starting noise), so the deltas measure the arm, not the seed.
The metrics are the scorer's (`adapter/eval_scores.py`); the defaults are CLIP's. `grid_html` (rows of
images under column labels) is the one image grid of every HTML page here and in `surd experiment`.
"""

from __future__ import annotations

import html as html_lib
import io
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.eval_scores import CLIP_METRICS, Metric
from surd.report import esc, thumbnail
from surd.shards import atomic_write_bytes

ALL_PROBES = "all probes"
HTML_ITEMS_PER_CATEGORY = 40  # keeps the page a few MB; every image is still in scores.parquet and images/
WINS_AND_LOSSES = 3  # per arm and category: the pairs where the arm gained and lost the most against base


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def ci95(values: list[float]) -> float | None:
    """Half-width of a normal-approximation 95% interval of the mean."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return round(1.96 * math.sqrt(var / len(values)), 4)


def _pair_key(record: dict[str, Any]) -> tuple[Any, ...]:
    return record["category"], record["item_id"], record["seed"], record.get("guidance")


def paired_with_base(records: list[dict[str, Any]], arm: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(arm record, base record) of the same prompt, seed and guidance."""
    base = {_pair_key(r): r for r in records if r["arm"] == "base"}
    return [(r, base[k]) for r in records if r["arm"] == arm and (k := _pair_key(r)) in base]


def _summarise_group(records: list[dict[str, Any]], arms: list[str], metrics: Sequence[Metric],
                     primary: str) -> dict[str, Any]:
    by_arm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_arm[record["arm"]].append(record)
    summary: dict[str, Any] = {
        "prompts": len({(r["category"], r["item_id"]) for r in records}),
        "arms": {},
        "vs_base": {},
    }
    first = {m.name: m for m in metrics}[primary]
    for arm in arms:
        rows = by_arm.get(arm, [])
        if not rows and arm != "base":
            continue  # e.g. the keyword arm on prompts without a keyword prompt
        entry: dict[str, Any] = {"images": len(rows)}
        for metric in metrics:
            entry[metric.name] = _mean([v for r in rows if (v := metric.value(r)) is not None])
        summary["arms"][arm] = entry
    for arm in summary["arms"]:
        if arm == "base":
            continue
        pairs = paired_with_base(records, arm)
        entry = {"pairs": len(pairs)}
        for metric in metrics:
            deltas = [a - b for r, s in pairs
                      if (a := metric.value(r)) is not None and (b := metric.value(s)) is not None]
            entry[f"{metric.name}_delta"] = _mean(deltas)
            entry[f"{metric.name}_delta_ci95"] = ci95(deltas)
        scored = [(a, b) for r, s in pairs if (a := first.value(r)) is not None and (b := first.value(s)) is not None]
        entry["win_rate"] = _mean([float(a > b) for a, b in scored])  # share of pairs where the arm scores higher
        summary["vs_base"][arm] = entry
    return summary


def group_name(record: dict[str, Any], several_guidances: bool) -> str:
    """The table a record counts in: its category, and its guidance scale when several were swept."""
    return f"{record['category']} · guidance {record['guidance']:g}" if several_guidances else record["category"]


def summarise(records: list[dict[str, Any]], arms: list[str], metrics: Sequence[Metric] = CLIP_METRICS,
              primary: str = "clip_narrative") -> dict[str, Any]:
    """Per category (`surd`, each probe set, all probes together; per guidance scale when several were swept):
    per-arm means and paired deltas vs base."""
    several = len({r.get("guidance") for r in records}) > 1
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    pooled: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[group_name(record, several)].append(record)
        if record["category"] != "surd":
            pooled[group_name({**record, "category": ALL_PROBES}, several)].append(record)
    if len({r["category"] for r in records if r["category"] != "surd"}) > 1:
        groups.update(pooled)
    return {name: _summarise_group(rows, arms, metrics, primary) for name, rows in groups.items()}


def metrics_of(results: dict[str, Any]) -> tuple[list[Metric], str]:
    """The scorer's metrics and primary metric, as results.json records them."""
    scorer = results["scorer"]
    return [Metric(**m) for m in scorer["metrics"]], scorer["primary"]


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


def category_table(summary: dict[str, Any], metrics: Sequence[Metric] = CLIP_METRICS,
                   primary: str = "clip_narrative") -> list[list[str]]:
    """Header plus one row per arm: the table both the Markdown and the HTML reports show."""
    first = {m.name: m for m in metrics}[primary]
    deltas = [first] + [m for m in metrics if m.share and m is not first][:1]
    rows = [["arm", "images", *(m.label for m in metrics),
             *(f"Δ {m.label} vs base (95% CI)" for m in deltas), "win rate vs base"]]
    for arm, entry in summary["arms"].items():
        versus = summary["vs_base"].get(arm, {})
        rows.append([arm, str(entry["images"]), *(_fmt(entry[m.name], pct=m.share) for m in metrics),
                     *((_delta(versus, m.name, pct=m.share) if versus else ("(reference)" if i == 0 else ""))
                       for i, m in enumerate(deltas)),
                     _fmt(versus.get("win_rate"), pct=True) if versus else ""])
    return rows


def guidance_table(results: dict[str, Any]) -> list[list[str]] | None:
    """With several guidance scales: the primary metric per arm (rows) and scale (columns), per category."""
    scales = results["config"]["guidance_scale"]
    if len(scales) < 2:
        return None
    metrics, primary = metrics_of(results)
    share = {m.name: m for m in metrics}[primary].share
    categories = list(dict.fromkeys(name.rsplit(" · guidance ", 1)[0] for name in results["categories"]))
    arms = list(dict.fromkeys(a["name"] for a in results["arms"]))
    rows = [["category", "arm", *(f"guidance {g:g}" for g in scales)]]
    for category in categories:
        for arm in arms:
            cells = []
            for g in scales:
                entry = results["categories"].get(f"{category} · guidance {g:g}", {}).get("arms", {}).get(arm)
                cells.append(_fmt(entry[primary], pct=share) if entry else "–")
            if any(c != "–" for c in cells):
                rows.append([category, arm, *cells])
    return rows


def _markdown_table(table: list[list[str]]) -> list[str]:
    keep = [i for i, _ in enumerate(table[0]) if any(row[i] not in ("–", "") for row in table[1:])]
    lines = []
    for n, row in enumerate(table):
        lines.append("| " + " | ".join(row[i] for i in keep) + " |")
        if n == 0:
            lines.append("|" + "|".join("---" for _ in keep) + "|")
    return lines


def _adapters(config: dict[str, Any]) -> str:
    named = ({"adapter": config["adapter"]} if config.get("adapter") else {}) | (config.get("adapters") or {})
    return "; ".join(f"{name}: `{path}`" for name, path in named.items()) or "none"


def markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    images = results["images"]
    metrics, primary = metrics_of(results)
    lines = [
        "# SUR-adapter evaluation", "",
        f"- base: `{c['base']}`; adapters: {_adapters(c)}; scorer: `{results['scorer']['label']}`",
        f"- seeds {', '.join(map(str, c['seeds']))}; {c['steps']} steps; guidance "
        f"{', '.join(f'{g:g}' for g in c['guidance_scale'])}",
        f"- images: {images['total']} ({images['generated']} generated this run, {images['reused']} reused)",
        "- `base` is the base model on the narrative prompt, `keyword` the base model on the keyword prompt (the "
        "ceiling); Δ columns are paired with the base image of the same prompt and seed.",
    ]
    sweep = guidance_table(results)
    if sweep:
        lines += ["", f"## guidance sweep ({primary})", "", *_markdown_table(sweep)]
    for category, summary in results["categories"].items():
        lines += ["", f"## {category} ({summary['prompts']} prompts)", ""]
        lines += _markdown_table(category_table(summary, metrics, primary))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#222;background:#fafafa}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
h3{font-size:1rem;margin-top:1.2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{padding:.25rem .6rem;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}.muted{color:#777;font-size:.85rem}
.item{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6rem;margin:.8rem 0;overflow-wrap:anywhere}
figure{margin:0;font-size:.8rem;text-align:center}.ok{color:#2e7d32}.bad{color:#c62828}
figure img{display:block;width:160px;height:auto}figure img.small{image-rendering:pixelated}
table.grid td,table.grid th{text-align:center;vertical-align:top;border:none}
table.grid th.row{text-align:left;max-width:18rem;font-weight:normal;font-size:.85rem;overflow-wrap:anywhere}
"""


@dataclass
class GridRow:
    """One row of an image grid: its label, and per column an image (bytes, or None for a blank) and a caption."""

    label: str
    images: list[bytes | None]
    captions: list[str] = field(default_factory=list)  # HTML, already escaped
    note: str = ""  # HTML under the label, already escaped


def grid_html(columns: list[str], rows: list[GridRow], small: bool = False) -> str:
    """A table of images: a header of column labels, then one labelled row per entry (thumbnails inlined)."""
    head = "<tr><th></th>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>"
    body = []
    for row in rows:
        cells = []
        for i, data in enumerate(row.images):
            caption = row.captions[i] if i < len(row.captions) else ""
            uri = thumbnail(data) if data else ""
            img = f'<img src="{uri}" alt="{esc(columns[i])}"{" class=small" if small else ""}>' if uri else ""
            cells.append(f"<td><figure>{img}<figcaption>{caption}</figcaption></figure></td>")
        label = f'<th class="row">{esc(row.label)}{"<br>" + row.note if row.note else ""}</th>'
        body.append(f'<tr class="row">{label}{"".join(cells)}</tr>')
    return f'<table class="grid">{head}{"".join(body)}</table>'


def _plain(caption: str) -> str:
    text = html_lib.unescape(re.sub(r"<[^>]+>", "", caption.replace("<br>", " · ")))
    return text.replace("✓", "[ok]").replace("✗", "[x]")  # the default bitmap font has neither mark


def grid_image(columns: list[str], rows: list[GridRow], cell: int = 96, label_width: int = 300) -> Any:
    """The same grid as one PIL image (for Markdown pages): small images scaled up without smoothing."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    line = 14

    def wrap(text: str, width: int) -> list[str]:
        words, lines = text.split(), [""]
        for word in words:
            trial = f"{lines[-1]} {word}".strip()
            if font.getlength(trial) <= width or not lines[-1]:
                lines[-1] = trial
            else:
                lines.append(word)
        return lines

    column = cell + 16
    header = [wrap(c, column - 6) for c in columns]
    head_height = line * max(len(h) for h in header) + 8
    heights = []
    for row in rows:
        under = max((len(wrap(_plain(c), column - 6)) for c in row.captions), default=0)
        heights.append(max(cell + line * under, line * len(wrap(row.label + " " + _plain(row.note), label_width))) + 12)
    grid = Image.new("RGB", (label_width + 12 + column * len(columns), head_height + sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    for i, lines in enumerate(header):
        for n, text in enumerate(lines):
            draw.text((label_width + 12 + i * column + 3, 4 + n * line), text, fill="black", font=font)
    y = head_height
    for row, height in zip(rows, heights, strict=True):
        draw.line([(0, y), (grid.width, y)], fill=(220, 220, 220))
        for n, text in enumerate(wrap(row.label + " " + _plain(row.note), label_width)):
            draw.text((6, y + 6 + n * line), text, fill="black" if n == 0 else (90, 90, 90), font=font)
        for i, data in enumerate(row.images):
            x = label_width + 12 + i * column + 8
            if data:
                with Image.open(io.BytesIO(data)) as image:
                    grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y + 6))
            caption = row.captions[i] if i < len(row.captions) else ""
            for n, text in enumerate(wrap(_plain(caption), column - 6)):
                draw.text((x - 5, y + 8 + cell + n * line), text, fill=(60, 60, 60), font=font)
        y += height
    return grid


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _caption(record: dict[str, Any], metric: Metric) -> str:
    value = metric.value(record)
    text = f"{metric.label} {_fmt(value, pct=metric.share) if metric.share else _fmt(value)}"
    if record.get("reading") is not None:
        mark = "ok" if record.get("reading_ok") else "bad"
        text += f'<br><span class="{mark}">{"✓" if record.get("reading_ok") else "✗"} {esc(record["reading"])}</span>'
    if record["generation_prompt"] != record["prompt"]:
        text += f'<br><span class="muted" title="{esc(record["generation_prompt"])}">(its own prompt)</span>'
    return text


def _image(record: dict[str, Any], out: Path) -> bytes | None:
    path = out / record["image"]
    return path.read_bytes() if path.is_file() else None


def _item(records: list[dict[str, Any]], arms: list[str], out: Path, metric: Metric) -> str:
    first = records[0]
    parts = [f'<div class="item"><p><b>{esc(first["prompt"])}</b> '
             f'<span class="muted">{esc(first["item_id"])}</span></p>']
    if first.get("keyword_prompt"):
        parts.append(f'<p class="muted">keyword prompt: {esc(first["keyword_prompt"])}</p>')
    if first.get("alternatives"):
        answer = first["alternatives"][first["answer"]]
        parts.append(f'<p class="muted">answer: {esc(answer)} · alternatives: '
                     f'{esc(" / ".join(first["alternatives"]))}</p>')
    if first.get("attributes"):
        parts.append(f'<p class="muted">attributes: {esc(first["attributes"])}</p>')
    by_seed: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for record in records:
        by_seed[record["seed"]][record["arm"]] = record
    present = [arm for arm in arms if any(arm in row for row in by_seed.values())]
    rows = [GridRow(f"seed {seed}", [_image(by_seed[seed][a], out) if a in by_seed[seed] else None for a in present],
                    [_caption(by_seed[seed][a], metric) if a in by_seed[seed] else "" for a in present])
            for seed in sorted(by_seed)]
    parts.append(grid_html(present, rows))
    return "".join(parts) + "</div>"


def wins_and_losses(records: list[dict[str, Any]], arm: str, metric: Metric,
                    k: int = WINS_AND_LOSSES) -> tuple[list[tuple[float, dict, dict]], list[tuple[float, dict, dict]]]:
    """The `k` pairs where `arm` beat base by the most, and the `k` where it lost the most (ties left out)."""
    deltas = [(a - b, r, s) for r, s in paired_with_base(records, arm)
              if (a := metric.value(r)) is not None and (b := metric.value(s)) is not None]
    deltas.sort(key=lambda d: (d[0], d[1]["item_id"], d[1]["seed"]))
    return [d for d in reversed(deltas[-k:]) if d[0] > 0], [d for d in deltas[:k] if d[0] < 0]


def _wins_and_losses_html(records: list[dict[str, Any]], arms: list[str], out: Path, metric: Metric) -> str:
    parts = []
    for arm in arms:
        if arm == "base":
            continue
        wins, losses = wins_and_losses(records, arm, metric)
        for title, pairs in (("wins", wins), ("losses", losses)):
            if not pairs:
                continue
            rows = [GridRow(f"{r['prompt']}", [_image(s, out), _image(r, out)],
                            [_caption(s, metric), _caption(r, metric)],
                            note=f'<span class="muted">seed {r["seed"]} · Δ {delta:+.3f}</span>')
                    for delta, r, s in pairs]
            parts.append(f"<h3>{esc(arm)}: largest {title} vs base</h3>" + grid_html(["base", arm], rows))
    if not parts:
        return ""
    return (f"<h2>Largest wins and losses ({esc(metric.label)}, paired with base)</h2>"
            "<p class='muted'>Per arm, the prompts and seeds where its image scored most above and most below the "
            f"base image of the same seed (up to {WINS_AND_LOSSES} each, all categories).</p>" + "".join(parts))


def html_page(results: dict[str, Any], records: list[dict[str, Any]], out: Path) -> str:
    metrics, primary = metrics_of(results)
    metric = {m.name: m for m in metrics}[primary]
    arms = list(dict.fromkeys(arm["name"] for arm in results["arms"]))
    several = len(results["config"]["guidance_scale"]) > 1
    by_item: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_item[group_name(record, several)][record["item_id"]].append(record)
    c = results["config"]
    body = [f"<h1>SUR-adapter evaluation</h1><p>base <code>{esc(c['base'])}</code> · adapters "
            f"{esc(_adapters(c))} · scorer <code>{esc(results['scorer']['label'])}</code> · seeds "
            f"{esc(', '.join(map(str, c['seeds'])))} · {esc(c['steps'])} steps · guidance "
            f"{esc(', '.join(f'{g:g}' for g in c['guidance_scale']))}</p><p class='muted'>Images of one row share the "
            "prompt and the seed (the same starting noise).</p>"]
    sweep = guidance_table(results)
    if sweep:
        body.append(f"<h2>Guidance sweep ({esc(metric.label)})</h2>{_html_table(sweep)}")
    for category, summary in results["categories"].items():
        table = _html_table(category_table(summary, metrics, primary))
        body.append(f"<h2>{esc(category)} ({summary['prompts']} prompts)</h2>{table}")
    body.append(_wins_and_losses_html(records, arms, out, metric))
    for category, items in by_item.items():
        listed = list(items.values())
        body.append(f"<h2>{esc(category)}: images</h2>")
        for item_records in listed[:HTML_ITEMS_PER_CATEGORY]:
            body.append(_item(item_records, arms, out, metric))
        if len(listed) > HTML_ITEMS_PER_CATEGORY:
            body.append(f'<p class="muted">{len(listed) - HTML_ITEMS_PER_CATEGORY} more prompts: see scores.parquet '
                        "and images/</p>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>SUR-adapter evaluation</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write_reports(results: dict[str, Any], records: list[dict[str, Any]], out: Path) -> None:
    """results.md and report.html beside results.json (each written atomically)."""
    atomic_write_bytes(out / "results.md", markdown(results).encode())
    atomic_write_bytes(out / "report.html", html_page(results, records, out).encode())
