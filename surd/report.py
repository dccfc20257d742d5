"""A self-contained HTML report of a run: stage funnel, drop reasons, histograms, sample images.

One file, no external references: inline CSS, inline SVG charts, images as base64 JPEG thumbnails.
Every piece of text from the data is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
import random
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from surd import layout, shards
from surd.layout import STAGES

THUMB_SIDE = 256
COLOURS = ("#3b7dd8", "#e8833a", "#4aa564", "#c8463d")
EXAMPLES_PER_REASON = 3

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#222;background:#fafafa}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{padding:.25rem .7rem;text-align:right;border-bottom:1px solid #eee}
td:first-child,th:first-child{text-align:left}.muted{color:#777;font-size:.85rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:1rem}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6rem;font-size:.85rem;overflow-wrap:anywhere}
.card img{display:block;max-width:100%;margin:0 auto .5rem}.card p{margin:.3rem 0}
.charts{display:flex;flex-wrap:wrap;gap:2rem}details{margin:.2rem 0}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def write_report(
    run_dir: Path, out: Path, stages: Sequence[str] = STAGES, samples: int = 24, seed: int = 0
) -> None:
    """Write the HTML report of `run_dir` to `out` (atomically)."""
    run_dir = Path(run_dir)
    present = [s for s in stages if (run_dir / s / "_stats").is_dir()]
    stats = {s: shards.stage_stats(run_dir / s) for s in present}
    files, label = sample_files(run_dir, present, stats)
    body = [f"<h1>SURD run report: {esc(run_dir.name)}</h1>"]
    body.append(funnel_section(stats))
    body.append(drops_section(run_dir, stats))
    body.append(histograms_section(files, label))
    body.append(samples_section(files, label, samples, seed))
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>SURD report: {esc(run_dir.name)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
    shards.atomic_write_bytes(Path(out), page.encode("utf-8"))


def sample_files(run_dir: Path, present: list[str], stats: dict[str, dict[str, Any]]) -> tuple[list[Path], str]:
    """The Parquet files the histograms and samples come from: the exported dataset, else the last stage with rows."""
    exported = sorted(layout.dataset_data_dir(run_dir).glob("*.parquet"))
    if exported:
        return exported, "surd/data"
    for stage in reversed(present):
        if stats[stage]["kept"] > 0:
            stage_dir = run_dir / stage
            return [shards.shard_path(stage_dir, rel) for rel in shards.shard_names(stage_dir)], stage
    return [], ""


# ---- sections ----


def funnel_section(stats: dict[str, dict[str, Any]]) -> str:
    if not stats:
        return "<h2>Stages</h2><p>No finished stage shards found.</p>"
    top = max(max(s["in"], s["kept"]) for s in stats.values()) or 1
    width, bar_h, label_w = 640, 22, 90
    height = bar_h * len(stats) + 10
    bars = []
    rows = []
    for i, (stage, s) in enumerate(stats.items()):
        y = 5 + i * bar_h
        dropped = sum(s["dropped"].values())
        kept_w = (width - label_w - 10) * s["kept"] / top
        drop_w = (width - label_w - 10) * dropped / top
        bars.append(
            f'<text x="0" y="{y + 15}" font-size="12">{esc(stage)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{kept_w:.1f}" height="{bar_h - 6}" fill="{COLOURS[2]}">'
            f"<title>{esc(stage)}: {s['kept']} kept</title></rect>"
            f'<rect x="{label_w + kept_w:.1f}" y="{y}" width="{drop_w:.1f}" height="{bar_h - 6}" fill="{COLOURS[3]}">'
            f"<title>{esc(stage)}: {dropped} dropped</title></rect>"
        )
        share = f"{100 * s['kept'] / s['in']:.1f}%" if s["in"] else "-"
        rows.append(
            f"<tr><td>{esc(stage)}</td><td>{s['in']}</td><td>{s['kept']}</td><td>{dropped}</td>"
            f"<td>{share}</td><td>{s['shards']}</td><td>{s['seconds']:.1f}</td></tr>"
        )
    svg = f'<svg width="{width}" height="{height}" role="img" aria-label="stage funnel">{"".join(bars)}</svg>'
    table = (
        "<table><tr><th>stage</th><th>in</th><th>kept</th><th>dropped</th><th>kept %</th>"
        f"<th>shards</th><th>seconds</th></tr>{''.join(rows)}</table>"
    )
    legend = f'<p class="muted"><span style="color:{COLOURS[2]}">&#9632;</span> kept '
    legend += f'<span style="color:{COLOURS[3]}">&#9632;</span> dropped</p>'
    return f"<h2>Stages</h2>{table}{svg}{legend}"


def drop_examples(stage_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Up to EXAMPLES_PER_REASON (id, detail) pairs per drop reason, in shard order."""
    examples: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for batch in shards.read_dropped(stage_dir, columns=["id", "drop_reason", "drop_detail"]):
        for rid, reason, detail in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
            if len(examples[reason]) < EXAMPLES_PER_REASON:
                examples[reason].append((rid, detail or ""))
    return examples


def drops_section(run_dir: Path, stats: dict[str, dict[str, Any]]) -> str:
    parts = ["<h2>Drop reasons</h2>"]
    any_drops = False
    for stage, s in stats.items():
        if not s["dropped"]:
            continue
        any_drops = True
        examples = drop_examples(run_dir / stage)
        top = max(s["dropped"].values())
        rows = []
        for reason, n in sorted(s["dropped"].items(), key=lambda kv: (-kv[1], kv[0])):
            rect = f'<rect width="{160 * n / top:.1f}" height="12" fill="{COLOURS[3]}"/>'
            bar = f'<svg width="160" height="12">{rect}</svg>'
            shown = "".join(f"<li>{esc(rid)}: {esc(detail)}</li>" for rid, detail in examples.get(reason, []))
            detail = f"<details><summary>examples</summary><ul>{shown}</ul></details>" if shown else ""
            rows.append(f"<tr><td>{esc(reason)}{detail}</td><td>{n}</td><td>{bar}</td></tr>")
        parts.append(
            f"<h3>{esc(stage)}</h3><table><tr><th>reason</th><th>rows</th><th></th></tr>{''.join(rows)}</table>"
        )
    if not any_drops:
        parts.append("<p>No rows were dropped.</p>")
    return "".join(parts)


def _read_columns(files: list[Path], wanted: list[str]) -> Iterator[dict[str, Any]]:
    """Rows of `files` with the `wanted` columns that exist (missing ones as None), in file order."""
    for path in files:
        pf = pq.ParquetFile(path)
        columns = [c for c in wanted if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(columns=columns, batch_size=256):
            for row in batch.to_pylist():
                yield {c: row.get(c) for c in wanted}


def _rows_at(files: list[Path], wanted: list[str], positions: set[int]) -> Iterator[dict[str, Any]]:
    """The rows at global `positions` (0-based over `files` in order), reading only row groups that hold one."""
    start = 0
    for path in files:
        pf = pq.ParquetFile(path)
        columns = [c for c in wanted if c in pf.schema_arrow.names]
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            hits = sorted(p - start for p in positions if start <= p < start + n)
            if hits:
                rows = pf.read_row_group(group, columns=columns).take(hits).to_pylist()
                yield from ({c: row.get(c) for c in wanted} for row in rows)
            start += n


def histogram_svg(title: str, series: dict[str, list[int]], max_bins: int = 20) -> str:
    """Side-by-side bar histogram of one or more integer series over shared integer bins."""
    values = [v for vs in series.values() for v in vs]
    if not values:
        return f"<div><h3>{esc(title)}</h3><p>No data.</p></div>"
    lo, hi = min(values), max(values)
    step = max(1, math.ceil((hi - lo + 1) / max_bins))
    bins = (hi - lo) // step + 1
    counts = {name: Counter((v - lo) // step for v in vs) for name, vs in series.items()}
    top = max(max(c.values(), default=0) for c in counts.values()) or 1
    width, height, pad = 420, 200, 30
    slot = (width - pad) / bins
    bar_w = slot / len(series)
    shapes = [f'<line x1="{pad}" y1="{height - pad}" x2="{width}" y2="{height - pad}" stroke="#999"/>']
    for k, (name, c) in enumerate(counts.items()):
        for b, n in sorted(c.items()):
            h = (height - pad - 10) * n / top
            x = pad + b * slot + k * bar_w
            left, right = lo + b * step, lo + (b + 1) * step - 1
            span = f"{left}" if step == 1 else f"{left}-{right}"
            shapes.append(
                f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}" '
                f'fill="{COLOURS[k % len(COLOURS)]}"><title>{esc(name)} {span}: {n}</title></rect>'
            )
    shapes.append(f'<text x="{pad}" y="{height - 12}" font-size="11">{lo}</text>')
    shapes.append(f'<text x="{width}" y="{height - 12}" font-size="11" text-anchor="end">{hi}</text>')
    shapes.append(f'<text x="0" y="12" font-size="11">{top}</text>')
    legend = " ".join(
        f'<span style="color:{COLOURS[k % len(COLOURS)]}">&#9632;</span> {esc(name)} ({len(series[name])})'
        for k, name in enumerate(series)
    )
    svg = f'<svg width="{width}" height="{height}" role="img" aria-label="{esc(title)}">{"".join(shapes)}</svg>'
    return f'<div><h3>{esc(title)}</h3>{svg}<p class="muted">{legend}</p></div>'


def histograms_section(files: list[Path], label: str) -> str:
    if not files:
        return "<h2>Distributions</h2><p>No kept rows to describe.</p>"
    series: dict[str, list[int]] = defaultdict(list)
    for row in _read_columns(files, ["width", "height", "keyword_prompt", "narrative_prompt"]):
        for key in ("width", "height"):
            if row[key] is not None:
                series[key].append(row[key])
        for key in ("keyword_prompt", "narrative_prompt"):
            if row[key]:
                series[key].append(len(row[key].split()))
    sizes = histogram_svg("Image size (pixels)", {k: series[k] for k in ("width", "height")})
    lengths = histogram_svg(
        "Prompt length (words)", {"keyword": series["keyword_prompt"], "narrative": series["narrative_prompt"]}
    )
    return f'<h2>Distributions <span class="muted">({esc(label)})</span></h2><div class="charts">{sizes}{lengths}</div>'


def thumbnail(data: bytes | None) -> str:
    """A base64 JPEG data URI of a thumbnail, or '' when the bytes do not decode."""
    if not data:
        return ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                img.thumbnail((THUMB_SIDE, THUMB_SIDE))
                buf = io.BytesIO()
                img.convert("RGB").save(buf, "JPEG", quality=80)
    except Exception:  # a report must render even around a bad image
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _card(row: dict[str, Any]) -> str:
    uri = thumbnail((row.get("image") or {}).get("bytes"))
    img = f'<img src="{uri}" alt="{esc(row["id"])}">' if uri else '<p class="muted">(no decodable image)</p>'
    size = f"{row['width']}x{row['height']}" if row.get("width") else ""
    lines = [img, f'<p class="muted">{esc(row["id"])} {esc(size)}</p>']
    lines.append(f"<p><b>keyword:</b> {esc(row.get('keyword_prompt'))}</p>")
    if row.get("narrative_prompt"):
        lines.append(f"<p><b>narrative:</b> {esc(row['narrative_prompt'])}</p>")
    scores = [(k, row.get(k)) for k in ("clip_keyword", "clip_narrative") if row.get(k) is not None]
    if scores:
        text = ", ".join(f"{k.removeprefix('clip_')} {v:.3f}" for k, v in scores)
        lines.append(f'<p class="muted">CLIP {esc(row.get("clip_model") or "")}: {esc(text)}</p>')
    return f'<div class="card">{"".join(lines)}</div>'


def samples_section(files: list[Path], label: str, samples: int, seed: int) -> str:
    if not files or samples <= 0:
        return ""
    total = sum(pq.read_metadata(p).num_rows for p in files)
    chosen = set(random.Random(seed).sample(range(total), min(samples, total)))
    wanted = ["id", "image", "width", "height", "keyword_prompt", "narrative_prompt"]
    wanted += ["clip_model", "clip_keyword", "clip_narrative"]
    cards = [_card(row) for row in _rows_at(files, wanted, chosen)]
    head = f'<h2>Samples <span class="muted">({len(cards)} of {total} rows in {esc(label)}, seed {seed})</span></h2>'
    return f'{head}<div class="grid">{"".join(cards)}</div>'
