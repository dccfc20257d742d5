"""A self-contained HTML report of a run: what built it, the stage funnel, CLIP scores against their thresholds,
what was dropped and why (with the images), what the LLM wrote that was rejected, and the training run if any.

One file, no external references: inline CSS, inline SVG charts (`surd.report_parts`), images as base64 JPEG
thumbnails. Every piece of text from the data is escaped. The narrative and training sections live in
`surd.report_more`; what the run recorded about itself is read through `surd.runinfo`.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from surd import layout, runinfo, shards
from surd.layout import STAGES
from surd.report_more import narratives_section, training_section
from surd.report_parts import DROPPED, KEPT, esc, histogram_svg, read_columns, rows_at, score_histogram_svg, thumbnail

EXAMPLES_PER_REASON = 3
THUMBS_PER_REASON = 4
__all__ = ["esc", "histogram_svg", "thumbnail", "write_report"]

CSS = """
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;background:#f3f4f6}
main{max-width:1180px;margin:0 auto;padding:1.5rem 1.5rem 4rem}
header{background:#1f2a44;color:#fff;padding:1.6rem 0 1.3rem}
header .inner{max-width:1180px;margin:0 auto;padding:0 1.5rem}
header h1{margin:0 0 .2rem;font-size:1.6rem;font-weight:650}header p{margin:0;color:#c9d1e3}
.tiles{display:flex;flex-wrap:wrap;gap:.8rem;margin-top:1rem}
.tile{background:rgba(255,255,255,.09);border-radius:10px;padding:.55rem 1rem;min-width:130px}
.tile b{display:block;font-size:1.45rem;font-weight:650}.tile span{color:#c9d1e3;font-size:.82rem}
section{background:#fff;border-radius:12px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:1.1rem 1.4rem 1.3rem;
margin:1.2rem 0}
h2{font-size:1.15rem;margin:0 0 .8rem}h3{font-size:.98rem;margin:1.1rem 0 .4rem}
table{border-collapse:collapse;margin:.4rem 0;font-size:.9rem}
td,th{padding:.3rem .7rem;text-align:right;border-bottom:1px solid #eceef1;vertical-align:top}
th{color:#57606a;font-weight:600;background:#f7f8fa}
td:first-child,th:first-child{text-align:left}td.text,th.text{text-align:left}
.muted{color:#6b7280;font-size:.85rem}.legend{font-size:.82rem;color:#57606a;margin:.2rem 0}
.legend span{margin-right:1rem}.legend i{display:inline-block;width:.8em;height:.8em;border-radius:2px;
margin-right:.3em;vertical-align:-.05em}
.charts{display:flex;flex-wrap:wrap;gap:1.5rem}figure{margin:0}figcaption{font-weight:600;font-size:.92rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:.9rem}
.card{background:#fff;border:1px solid #e3e6ea;border-radius:10px;padding:.6rem;font-size:.85rem;
overflow-wrap:anywhere}
.card img{display:block;width:100%;height:190px;object-fit:contain;background:#f3f4f6;border-radius:6px;
margin:0 0 .45rem}.card p{margin:.25rem 0}
.thumbs{display:flex;flex-wrap:wrap;gap:.6rem;margin:.3rem 0 .8rem}
.thumb{width:150px;font-size:.75rem;color:#57606a;overflow-wrap:anywhere}
.thumb img{display:block;width:150px;height:150px;object-fit:contain;background:#f3f4f6;border-radius:6px}
.pair{display:flex;gap:.35rem;padding:.35rem;border:1px solid #e3e6ea;border-radius:10px}
table.drops{width:100%;table-layout:fixed}table.drops th:nth-child(1){width:16rem}
table.drops th:nth-child(2){width:4.5rem}table.drops th:nth-child(3){width:9rem}
table.drops .thumbs{margin:0;gap:.45rem}
table.drops .thumb{width:104px;font-size:.7rem;line-height:1.25}
table.drops .thumb img{width:104px;height:104px;margin-bottom:.15rem}
td code.short{white-space:nowrap}
.tag{display:inline-block;padding:0 .45rem;border-radius:999px;font-size:.75rem;background:#eef1f5;color:#374151}
.tag.drop{background:#fbe9e7;color:#9f2d20}.tag.keep{background:#e7f4ea;color:#1f6b35}
.kv{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:.4rem 1.6rem}
.kv table{width:100%}.kv td:first-child,.kv td:last-child{white-space:nowrap;width:1%}
details summary{cursor:pointer;color:#3b5bdb}code{font-size:.85em;background:#f3f4f6;padding:0 .25em;
border-radius:4px}
"""


def write_report(
    run_dir: Path, out: Path, stages: Sequence[str] = STAGES, samples: int = 24, seed: int = 0
) -> None:
    """Write the HTML report of `run_dir` to `out` (atomically)."""
    run_dir = Path(run_dir)
    present = [s for s in stages if (run_dir / s / "_stats").is_dir()]
    stats = {s: shards.stage_stats(run_dir / s) for s in present}
    files, label = sample_files(run_dir, present, stats)
    settings = runinfo.stage_settings(run_dir)
    body = [
        models_section(settings, files),
        funnel_section(stats),
        scores_section(run_dir, settings),
        drops_section(run_dir, stats),
        narratives_section(run_dir, files),
        histograms_section(files, label),
        samples_section(files, label, samples, seed),
        training_section(run_dir),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>SURD report: {esc(run_dir.name)}</title><style>{CSS}</style></head>"
        f"<body>{header(run_dir, stats)}<main>{''.join(b for b in body if b)}</main></body></html>\n"
    )
    shards.atomic_write_bytes(Path(out), page.encode("utf-8"))


def header(run_dir: Path, stats: dict[str, dict[str, Any]]) -> str:
    tiles = []
    if stats:
        first, last = next(iter(stats.values())), stats[list(stats)[-1]]
        dropped = sum(sum(s["dropped"].values()) for s in stats.values())
        seconds = sum(s["seconds"] for s in stats.values())
        tiles = [(first["in"], "rows in"), (last["kept"], f"rows after {list(stats)[-1]}"), (dropped, "dropped"),
                 (len(stats), "stages"), (f"{seconds:.0f} s", "stage time")]
    shown = "".join(f'<div class="tile"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for v, k in tiles)
    return (f'<header><div class="inner"><h1>SURD run report: {esc(run_dir.name)}</h1>'
            f'<p>image, keyword prompt, narrative prompt</p><div class="tiles">{shown}</div></div></header>')


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


def _code(value: Any) -> str:
    """A setting's value as code; short ones never wrap."""
    text = str(value)
    return f'<code class="short">{esc(text)}</code>' if len(text) <= 32 else f"<code>{esc(text)}</code>"


def models_section(settings: dict[str, dict[str, Any]], files: list[Path]) -> str:
    """The models and thresholds that built the data: from the stages' recorded settings and from the rows."""
    parts = []
    used = runinfo.row_models(files) if files else {}
    named = [(what, value, n) for what, counts in used.items() for value, n in counts.most_common()]
    if named:
        rows = "".join(f'<tr><td>{esc(what)}</td><td class="text">{_code(value)}</td><td>{n}</td></tr>'
                       for what, value, n in named)
        parts.append(f'<table><tr><th>named in the rows</th><th class="text">value</th><th>rows</th></tr>{rows}'
                     "</table>")
    chosen = runinfo.models_and_thresholds(settings)
    by_stage: dict[str, list[str]] = defaultdict(list)
    for stage, kind, key, value in chosen:
        by_stage[stage].append(f'<tr><td>{esc(key)}</td><td class="text">{_code(value)}</td>'
                               f'<td><span class="tag">{esc(kind)}</span></td></tr>')
    blocks = "".join(f"<div><h3>{esc(stage)}</h3><table>{''.join(rows)}</table></div>"
                     for stage, rows in by_stage.items())
    if blocks:
        parts.append(f'<div class="kv">{blocks}</div>')
    if settings:
        every = "".join(f"<h3>{esc(stage)}</h3><p class=\"muted\">"
                        + ", ".join(f"{esc(k)}=<code>{esc(v)}</code>" for k, v in values.items()) + "</p>"
                        for stage, values in settings.items())
        parts.append(f"<details><summary>every recorded setting</summary>{every}</details>")
    else:
        parts.append('<p class="muted">The stages recorded no settings (a run made by an earlier surd); the models '
                     "above are the ones its rows name.</p>")
    return "<section><h2>Models and thresholds</h2>" + "".join(parts) + "</section>"


def funnel_section(stats: dict[str, dict[str, Any]]) -> str:
    if not stats:
        return "<section><h2>Stages</h2><p>No finished stage shards found.</p></section>"
    top = max(max(s["in"], s["kept"]) for s in stats.values()) or 1
    width, bar_h, label_w = 560, 24, 64
    height = bar_h * len(stats) + 10
    bars = []
    rows = []
    for i, (stage, s) in enumerate(stats.items()):
        y = 5 + i * bar_h
        dropped = sum(s["dropped"].values())
        kept_w = (width - label_w - 60) * s["kept"] / top
        drop_w = (width - label_w - 60) * dropped / top
        bars.append(
            f'<text x="0" y="{y + 14}" font-size="12">{esc(stage)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{kept_w:.1f}" height="{bar_h - 7}" rx="3" fill="{KEPT}">'
            f"<title>{esc(stage)}: {s['kept']} kept</title></rect>"
            f'<rect x="{label_w + kept_w:.1f}" y="{y}" width="{drop_w:.1f}" height="{bar_h - 7}" rx="3" '
            f'fill="{DROPPED}"><title>{esc(stage)}: {dropped} dropped</title></rect>'
            f'<text x="{label_w + kept_w + drop_w + 6:.1f}" y="{y + 13}" font-size="11" fill="#57606a">'
            f"{s['kept']}/{s['in']}</text>"
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
    legend = f'<p class="legend"><span><i style="background:{KEPT}"></i>kept</span>'
    legend += f'<span><i style="background:{DROPPED}"></i>dropped</span></p>'
    return f'<section><h2>Stages</h2><div class="charts"><div>{svg}{legend}</div>{table}</div></section>'


def scores_section(run_dir: Path, settings: dict[str, dict[str, Any]]) -> str:
    """CLIP scores of every row the score stage judged, kept and dropped, with its thresholds drawn on."""
    values = runinfo.clip_values(run_dir)
    if not any(values.values()):
        return ""
    score = settings.get("score", {})
    lines: list[tuple[float, str]] = []
    if score.get("min_narrative") is not None:
        lines.append((float(score["min_narrative"]), f"min_narrative {score['min_narrative']}"))
    cutoff = runinfo.score_cutoff(run_dir)
    if cutoff is not None:
        lines.append((cutoff, f"p{score['min_narrative_percentile']:g} = {cutoff:.3f}"))
    charts = [score_histogram_svg("clip_narrative (the chosen narrative vs its image)", values["clip_narrative"],
                                  lines),
              score_histogram_svg("clip_keyword (the keyword prompt vs its image)", values["clip_keyword"], [])]
    notes = []
    if score.get("max_keyword_gap") is not None:
        notes.append(f"max_keyword_gap {score['max_keyword_gap']}: a row is also dropped when its narrative scores "
                     "more than this below its keyword prompt.")
    if not score:
        notes.append("The score stage recorded no settings, so its thresholds are not drawn.")
    note = "".join(f'<p class="muted">{esc(n)}</p>' for n in notes)
    return f'<section><h2>CLIP scores</h2><div class="charts">{"".join(charts)}</div>{note}</section>'


def _dropped_with_images(stage_dir: Path, wanted: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """Up to wanted[reason] dropped rows per reason, with their image, read a few rows at a time."""
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    columns = ["id", "image", "keyword_prompt", "narrative_prompt", "clip_narrative", "drop_reason", "drop_detail"]
    root = stage_dir / "dropped"
    for path in sorted(root.rglob("*.parquet")) if root.is_dir() else []:
        if path.name.startswith("."):
            continue
        for batch in pq.ParquetFile(path).iter_batches(batch_size=32, columns=columns):
            for row in batch.to_pylist():
                if len(found[row["drop_reason"]]) < wanted.get(row["drop_reason"], 0):
                    found[row["drop_reason"]].append(row)
            if all(len(found[r]) >= n for r, n in wanted.items()):
                return found
    return found


def _kept_images(stage_dir: Path, ids: set[str]) -> dict[str, bytes | None]:
    """The image bytes of kept rows by id (the rows a near-duplicate was dropped in favour of)."""
    out: dict[str, bytes | None] = {}
    for rel in shards.shard_names(stage_dir) if ids else []:
        path = shards.shard_path(stage_dir, rel)
        found = [i for i, v in enumerate(pq.read_table(path, columns=["id"]).column("id").to_pylist()) if v in ids]
        if found:
            for row in pq.read_table(path, columns=["id", "image"]).take(found).to_pylist():
                out[row["id"]] = (row["image"] or {}).get("bytes")
    return out


def _thumb(data: bytes | None, caption: str, alt: str) -> str:
    uri = thumbnail(data)
    img = f'<img src="{uri}" alt="{esc(alt)}">' if uri else '<p class="muted">(no decodable image)</p>'
    return f'<div class="thumb">{img}{caption}</div>'


def _drop_thumbs(stage: str, rows: list[dict[str, Any]], kept: dict[str, bytes | None]) -> str:
    cells = []
    for row in rows:
        caption = f"{esc(row['id'])}"
        if row.get("clip_narrative") is not None:
            caption += f"<br>clip_narrative {row['clip_narrative']:.3f}"
        if stage == "dedup" and row.get("drop_detail") in kept:
            dropped = _thumb((row["image"] or {}).get("bytes"), f'<span class="tag drop">dropped</span> {caption}',
                             row["id"])
            kept_id = row["drop_detail"]
            keeper = _thumb(kept[kept_id], f'<span class="tag keep">kept</span> {esc(kept_id)}', kept_id)
            cells.append(f'<div class="pair">{dropped}{keeper}</div>')
        else:
            cells.append(_thumb((row["image"] or {}).get("bytes"), caption, row["id"]))
    return f'<div class="thumbs">{"".join(cells)}</div>' if cells else ""


def drops_section(run_dir: Path, stats: dict[str, dict[str, Any]]) -> str:
    parts = ["<section><h2>Drop reasons</h2>"]
    any_drops = False
    for stage, s in stats.items():
        if not s["dropped"]:
            continue
        any_drops = True
        stage_dir = run_dir / stage
        examples = drop_examples(stage_dir)
        with_images = _dropped_with_images(stage_dir, {r: min(n, THUMBS_PER_REASON) for r, n in s["dropped"].items()})
        kept = _kept_images(stage_dir, {r["drop_detail"] for rows in with_images.values() for r in rows
                                        if stage == "dedup" and r.get("drop_detail")})
        top = max(s["dropped"].values())
        rows = []
        for reason, n in sorted(s["dropped"].items(), key=lambda kv: (-kv[1], kv[0])):
            rect = f'<rect width="{120 * n / top:.1f}" height="12" rx="2" fill="{DROPPED}"/>'
            bar = f'<svg width="120" height="12">{rect}</svg>'
            shown = "".join(f"<li>{esc(rid)}: {esc(detail)}</li>" for rid, detail in examples.get(reason, []))
            detail = f"<details><summary>examples</summary><ul>{shown}</ul></details>" if shown else ""
            found = with_images.get(reason, [])
            images = _drop_thumbs(stage, found, kept) if any((r.get("image") or {}).get("bytes") for r in found) else ""
            rows.append(f'<tr><td>{esc(reason)}{detail}</td><td>{n}</td><td>{bar}</td><td class="text">{images}</td>'
                        "</tr>")
        parts.append(f'<h3>{esc(stage)}</h3><table class="drops"><tr><th>reason</th><th>rows</th><th></th>'
                     f'<th class="text">some of them</th></tr>{"".join(rows)}</table>')
    if not any_drops:
        parts.append("<p>No rows were dropped.</p>")
    return "".join(parts) + "</section>"


def drop_examples(stage_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Up to EXAMPLES_PER_REASON (id, detail) pairs per drop reason, in shard order."""
    examples: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for batch in shards.read_dropped(stage_dir, columns=["id", "drop_reason", "drop_detail"]):
        for rid, reason, detail in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
            if len(examples[reason]) < EXAMPLES_PER_REASON:
                examples[reason].append((rid, detail or ""))
    return examples


def histograms_section(files: list[Path], label: str) -> str:
    if not files:
        return "<section><h2>Distributions</h2><p>No kept rows to describe.</p></section>"
    series: dict[str, list[int]] = defaultdict(list)
    for row in read_columns(files, ["width", "height", "keyword_prompt", "narrative_prompt"]):
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
    return (f'<section><h2>Distributions <span class="muted">({esc(label)})</span></h2>'
            f'<div class="charts">{sizes}{lengths}</div></section>')


def _card(row: dict[str, Any]) -> str:
    uri = thumbnail((row.get("image") or {}).get("bytes"))
    img = f'<img class="sample" src="{uri}" alt="{esc(row["id"])}">' if uri else \
        '<p class="muted">(no decodable image)</p>'
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
    cards = [_card(row) for row in rows_at(files, wanted, chosen)]
    head = f'<h2>Samples <span class="muted">({len(cards)} of {total} rows in {esc(label)}, seed {seed})</span></h2>'
    return f'<section>{head}<div class="grid">{"".join(cards)}</div></section>'
