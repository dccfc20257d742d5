"""The run report's narrative and training sections (the page itself is `surd.report`).

- Narratives: what the LLM wrote that the pair stage rejected, beside the reason (the side table the pair stage
  hands the executor, `pair/_side/rejected/`), and narratives shared by rows with different keyword prompts
  (a template's example copied, or a model that says the same thing about everything).
- Training: when the run has an adapter (`RUN/adapter`, `surd.layout.adapter_dir`): its settings, the loss curve
  (`logs/losses.csv`) and the validation images (`validation/step-NNNNNNN.png`). Files are read, never imported.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from surd import layout
from surd.pair import clean_output
from surd.report_parts import esc, line_chart_svg, rows_at, thumbnail
from surd.runinfo import shared_narratives

REJECTED_PER_REASON = 4
SHARED_GROUPS = 8
SHARED_THUMBS = 4
VALIDATION_SIDE = 1024
VALIDATION_MIN = 384
TRAIN_KEYS = ("base", "llm", "layer", "max_steps", "learning_rate", "batch_size", "resolution", "mixed_precision")


def rejected_outputs(run_dir: Path) -> list[dict[str, Any]]:
    """Every output the pair stage rejected, with its reason (empty for a run without the side table)."""
    root = layout.stage_dir(run_dir, "pair") / "_side" / "rejected"
    rows: list[dict[str, Any]] = []
    for path in sorted(root.rglob("*.parquet")) if root.is_dir() else []:
        if not path.name.startswith("."):
            rows += pq.read_table(path).to_pylist()
    return rows


def _rejected_html(run_dir: Path) -> str:
    rejected = rejected_outputs(run_dir)
    if not rejected:
        if layout.stage_dir(run_dir, "pair").is_dir():
            return ('<h3>Rejected LLM outputs</h3><p class="muted">None recorded: every output passed, or the run was '
                    "made by an earlier surd.</p>")
        return ""
    counts = Counter(r["reason"] for r in rejected)
    rows = []
    for reason, n in counts.most_common():
        examples = [r for r in rejected if r["reason"] == reason][:REJECTED_PER_REASON]
        for k, r in enumerate(examples):
            head = f'<td rowspan="{len(examples)}"><b>{esc(reason)}</b><br>{n}</td>' if k == 0 else ""
            judged = clean_output(r["output"] or "") or r["output"]  # what the validator read; the reply on hover
            rows.append(f'<tr>{head}<td class="text" title="{esc(r["output"])}">{esc(judged)}</td>'
                        f'<td class="text muted">{esc(r["keyword_prompt"])}</td><td class="muted">{esc(r["id"])}'
                        f'</td></tr>')
    return (f"<h3>Rejected LLM outputs <span class=\"muted\">({len(rejected)} outputs, every attempt)</span></h3>"
            '<table><tr><th>reason</th><th class="text">what the model wrote</th>'
            f'<th class="text">keyword prompt</th><th>row</th></tr>{"".join(rows)}</table>')


def _shared_html(files: list[Path]) -> str:
    shared = shared_narratives(files)
    if not shared:
        return ('<h3>Shared narratives</h3><p class="muted">No narrative is shared by rows with different keyword '
                "prompts.</p>")
    shown = shared[:SHARED_GROUPS]
    wanted = {p for _, positions in shown for p in positions[:SHARED_THUMBS]}
    rows = {p: row for p, row in zip(sorted(wanted), rows_at(files, ["id", "image", "keyword_prompt"], wanted),
                                     strict=True)}
    blocks = []
    for text, positions in shown:
        thumbs = []
        for p in positions[:SHARED_THUMBS]:
            row = rows[p]
            uri = thumbnail((row["image"] or {}).get("bytes"))
            img = f'<img src="{uri}" alt="{esc(row["id"])}">' if uri else ""
            thumbs.append(f'<div class="thumb">{img}{esc(row["keyword_prompt"])}</div>')
        blocks.append(f'<p><b>{esc(text)}</b> <span class="muted">({len(positions)} rows)</span></p>'
                      f'<div class="thumbs">{"".join(thumbs)}</div>')
    rows_total = sum(len(p) for _, p in shared)
    what = "1 narrative" if len(shared) == 1 else f"{len(shared)} narratives"
    return (f'<h3>Shared narratives <span class="muted">({what} shared by {rows_total} rows with different keyword '
            "prompts)</span></h3>" + "".join(blocks))


def narratives_section(run_dir: Path, files: list[Path]) -> str:
    """Rejected LLM outputs with their reasons, and narratives shared across different keyword prompts."""
    rejected = _rejected_html(run_dir)
    shared = _shared_html(files) if files else ""
    if not rejected and not shared:
        return ""
    return f"<section><h2>Narratives</h2>{rejected}{shared}</section>"


def _losses(path: Path) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    try:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key in ("step", "lr") or value in (None, ""):
                        continue
                    try:
                        series[key].append((float(row["step"]), float(value)))
                    except (TypeError, ValueError):
                        continue
    except OSError:
        return {}
    return {k: v for k, v in series.items() if v}


def _validation(path: Path) -> str:
    """One validation grid, shown at least VALIDATION_MIN wide (tiny test models draw 32-pixel images)."""
    data = path.read_bytes()
    uri = thumbnail(data, VALIDATION_SIDE)
    if not uri:
        return ""
    with Image.open(io.BytesIO(data)) as img:
        width = img.width
    shown = min(VALIDATION_SIDE, width * max(1, VALIDATION_MIN // max(width, 1)))
    step = path.stem.removeprefix("step-").lstrip("0") or "0"
    return (f'<figure><figcaption>Validation at step {esc(step)} <span class="muted">(base model | with the adapter, '
            f'same seed; one row per prompt)</span></figcaption><img class="validation" src="{uri}" '
            f'alt="validation step {esc(step)}" style="width:{shown}px;max-width:100%;border-radius:8px;'
            'image-rendering:pixelated"></figure>')


def training_section(run_dir: Path) -> str:
    """The adapter trained on this run: settings, loss curve, validation images (empty without RUN/adapter)."""
    folder = layout.adapter_dir(run_dir)
    if not folder.is_dir():
        return ""
    try:
        config = json.loads((folder / "train_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    kind = (config.get("adapter") or {}).get("kind") if isinstance(config.get("adapter"), dict) else None
    settings = [(k, config[k]) for k in TRAIN_KEYS if config.get(k) is not None]
    if kind:
        settings.insert(0, ("adapter.kind", kind))
    state = "finished" if (folder / "adapter.safetensors").is_file() else "not finished (no adapter.safetensors)"
    top = []
    if settings:
        cells = "".join(f'<tr><td>{esc(k)}</td><td class="text"><code>{esc(layout.portable(v, run_dir))}</code></td>'
                        "</tr>" for k, v in settings)
        top.append(f"<table>{cells}</table>")
    losses = _losses(folder / "logs" / "losses.csv")
    if losses:
        top.append(line_chart_svg("Training loss by step", losses))
    parts = [f'<div class="charts">{"".join(top)}</div>'] if top else []
    images = sorted((folder / "validation").glob("step-*.png")) if (folder / "validation").is_dir() else []
    for path in images[-1:] if len(images) < 2 else [images[0], images[-1]]:
        parts.append(_validation(path))
    return f'<section><h2>Training <span class="muted">({esc(state)})</span></h2>{"".join(parts)}</section>'
