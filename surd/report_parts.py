"""The run report's parts: inline SVG charts (integer histograms, score histograms with thresholds, line charts),
thumbnails, and readers of a few rows or columns of Parquet files.

Every chart is one `<svg>` with a `<title>` on each bar or point (the browser shows it on hover), no scripts and no
external references; every text from the data goes through `esc`.
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

COLOURS = ("#3b7dd8", "#e8833a", "#4aa564", "#c8463d", "#8a63d2", "#6b7785")
KEPT, DROPPED, LINE = "#4aa564", "#c8463d", "#222"
THUMB_SIDE = 256


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _legend(items: list[tuple[str, str]]) -> str:
    return '<p class="legend">' + " ".join(
        f'<span><i style="background:{colour}"></i>{esc(name)}</span>' for name, colour in items) + "</p>"


def histogram_svg(title: str, series: dict[str, list[int]], max_bins: int = 20) -> str:
    """Side-by-side bar histogram of one or more integer series over shared integer bins."""
    values = [v for vs in series.values() for v in vs]
    if not values:
        return f'<figure class="chart"><figcaption>{esc(title)}</figcaption><p class="muted">No data.</p></figure>'
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
    legend = _legend([(f"{name} ({len(series[name])})", COLOURS[k % len(COLOURS)]) for k, name in enumerate(series)])
    svg = f'<svg width="{width}" height="{height}" role="img" aria-label="{esc(title)}">{"".join(shapes)}</svg>'
    return f'<figure class="chart"><figcaption>{esc(title)}</figcaption>{svg}{legend}</figure>'


def score_histogram_svg(title: str, values: list[tuple[float, bool]], lines: list[tuple[float, str]],
                        bins: int = 30) -> str:
    """Histogram of float scores, kept and dropped rows stacked, with each threshold drawn as a labelled line."""
    if not values:
        return f'<figure class="chart"><figcaption>{esc(title)}</figcaption><p class="muted">No scores.</p></figure>'
    xs = [v for v, _ in values] + [x for x, _ in lines]
    lo, hi = min(xs), max(xs)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.05, hi + 0.05
    margin = (hi - lo) * 0.04
    lo, hi = lo - margin, hi + margin
    width, height, left, bottom, top_pad = 460, 230, 34, 28, 26
    plot_w, plot_h = width - left - 8, height - bottom - top_pad
    step = (hi - lo) / bins
    kept, dropped = Counter(), Counter()
    for value, is_kept in values:
        (kept if is_kept else dropped)[min(int((value - lo) / step), bins - 1)] += 1
    top = max((kept[b] + dropped[b] for b in range(bins)), default=1) or 1

    def x_of(value: float) -> float:
        return left + plot_w * (value - lo) / (hi - lo)

    shapes = [f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" '
              f'stroke="#999"/>']
    for b in range(bins):
        y = top_pad + plot_h
        for count, colour, name in ((kept[b], KEPT, "kept"), (dropped[b], DROPPED, "dropped")):
            if not count:
                continue
            h = plot_h * count / top
            y -= h
            span = f"{lo + b * step:.3f} to {lo + (b + 1) * step:.3f}"
            shapes.append(f'<rect x="{x_of(lo + b * step) + 0.5:.1f}" y="{y:.1f}" '
                          f'width="{max(plot_w / bins - 1, 1):.1f}" height="{h:.1f}" fill="{colour}">'
                          f"<title>{name}, {span}: {count}</title></rect>")
    for k, (x, label) in enumerate(lines):
        px = x_of(x)
        shapes.append(f'<line class="threshold" x1="{px:.1f}" y1="{top_pad - 4}" x2="{px:.1f}" '
                      f'y2="{top_pad + plot_h}" stroke="{LINE}" stroke-width="1.5" stroke-dasharray="4 3">'
                      f"<title>{esc(label)}</title></line>")
        anchor = "end" if px > left + plot_w * 0.6 else "start"
        shift = -4 if anchor == "end" else 4
        shapes.append(f'<text x="{px + shift:.1f}" y="{12 + 11 * (k % 2)}" font-size="11" text-anchor="{anchor}">'
                      f"{esc(label)}</text>")
    for i in range(5):  # axis ticks: cosine similarity
        value = lo + i * (hi - lo) / 4
        anchor = ("start", "middle", "middle", "middle", "end")[i]
        label = f"{value:.2f}".replace("-0.00", "0.00")
        shapes.append(f'<line x1="{x_of(value):.1f}" y1="{top_pad + plot_h}" x2="{x_of(value):.1f}" '
                      f'y2="{top_pad + plot_h + 4}" stroke="#999"/><text x="{x_of(value):.1f}" y="{height - 8}" '
                      f'font-size="11" fill="#57606a" text-anchor="{anchor}">{label}</text>')
    shapes.append(f'<text x="{left - 4}" y="{top_pad + 8}" font-size="11" text-anchor="end">{top}</text>')
    n_kept = sum(kept.values())
    legend = _legend([(f"kept ({n_kept})", KEPT), (f"dropped ({len(values) - n_kept})", DROPPED)])
    svg = f'<svg width="{width}" height="{height}" role="img" aria-label="{esc(title)}">{"".join(shapes)}</svg>'
    return f'<figure class="chart"><figcaption>{esc(title)}</figcaption>{svg}{legend}</figure>'


def line_chart_svg(title: str, series: dict[str, list[tuple[float, float]]], x_label: str = "step") -> str:
    """One polyline per series over shared axes (e.g. loss terms by step)."""
    points = [p for ps in series.values() for p in ps]
    if not points:
        return f'<figure class="chart"><figcaption>{esc(title)}</figcaption><p class="muted">No data.</p></figure>'
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)
    width, height, left, bottom, top_pad = 560, 240, 46, 28, 10
    plot_w, plot_h = width - left - 10, height - bottom - top_pad

    def at(x: float, y: float) -> str:
        px, py = left + plot_w * (x - x_lo) / (x_hi - x_lo), top_pad + plot_h * (1 - (y - y_lo) / (y_hi - y_lo))
        return f"{px:.1f},{py:.1f}"

    shapes = [f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" stroke="#999"/>',
              f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + plot_h}" stroke="#999"/>']
    for k, (name, ps) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        shapes.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" '
                      f'points="{" ".join(at(x, y) for x, y in ps)}"><title>{esc(name)}</title></polyline>')
    shapes.append(f'<text x="{left}" y="{height - 8}" font-size="11">{esc(x_label)} {x_lo:g}</text>')
    shapes.append(f'<text x="{left + plot_w}" y="{height - 8}" font-size="11" text-anchor="end">{x_hi:g}</text>')
    shapes.append(f'<text x="{left - 4}" y="{top_pad + 10}" font-size="11" text-anchor="end">{y_hi:.3g}</text>')
    shapes.append(f'<text x="{left - 4}" y="{top_pad + plot_h}" font-size="11" text-anchor="end">{y_lo:.3g}</text>')
    legend = _legend([(f"{name} ({len(ps)} points)", COLOURS[k % len(COLOURS)])
                      for k, (name, ps) in enumerate(series.items())])
    svg = f'<svg width="{width}" height="{height}" role="img" aria-label="{esc(title)}">{"".join(shapes)}</svg>'
    return f'<figure class="chart"><figcaption>{esc(title)}</figcaption>{svg}{legend}</figure>'


def thumbnail(data: bytes | None, side: int = THUMB_SIDE) -> str:
    """A base64 JPEG data URI of a thumbnail, or '' when the bytes do not decode."""
    if not data:
        return ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                img.thumbnail((side, side))
                buf = io.BytesIO()
                img.convert("RGB").save(buf, "JPEG", quality=80)
    except Exception:  # a report must render even around a bad image
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def read_columns(files: list[Path], wanted: list[str]) -> Iterator[dict[str, Any]]:
    """Rows of `files` with the `wanted` columns that exist (missing ones as None), in file order."""
    for path in files:
        pf = pq.ParquetFile(path)
        columns = [c for c in wanted if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(columns=columns, batch_size=256):
            for row in batch.to_pylist():
                yield {c: row.get(c) for c in wanted}


def rows_at(files: list[Path], wanted: list[str], positions: set[int]) -> Iterator[dict[str, Any]]:
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
