"""What a run folder says about how it was made: the settings each stage recorded, the models its rows name, and
the thresholds it applied. Read by the run report (`surd.report`) and the dataset card (`pipelines.card`).

Settings come from each stage's `_fingerprint.json` (`{"settings": {...}}`; collect records one per source in
`collect/<source>/_fingerprint.json`); a stage that recorded none (a run made by an earlier surd) has none here.
The models are also read from the rows themselves (`narrative_origin`, `clip_model`), which every run records.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from surd import layout, shards

# Settings that name what made the data (a model, a template, how it was used), and ones that are thresholds.
_MODEL_KEYS = re.compile(r"^(model|model_path|pretrained|template|strategy|backend|caption_model|\w+_model)$")
_THRESHOLD_KEYS = re.compile(r"(^|_)(min|max|threshold|percentile|gap|fraction|mode)(_|$)")
_PACING_KEYS = re.compile(r"(batch_size|num_|device|threads|concurrency|timeout|retries|retry|backoff|cache|"
                          r"requests_per_second|per_host|api_key|base_url|max_bytes|max_redirects|max_new_tokens)")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def stage_settings(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Recorded settings by stage (collect: by `collect/<source>`), in data-flow order; stages without any left out."""
    out: dict[str, dict[str, Any]] = {}
    for stage in layout.STAGES:
        folder = layout.stage_dir(run_dir, stage)
        if stage == "collect":  # one record per source: in its folder, or all of them in the stage's record
            sources = dict((_read_json(folder / layout.FINGERPRINT) or {}).get("sources") or {})
            for source in sorted(p for p in folder.glob("*/") if p.is_dir()) if folder.is_dir() else []:
                sources.setdefault(source.name, _read_json(source / layout.FINGERPRINT) or {})
            for name, record in sorted(sources.items()):
                if isinstance(record, dict) and isinstance(record.get("settings"), dict):
                    out[f"collect/{name}"] = {"type": record.get("source"), **record["settings"]}
            continue
        record = _read_json(folder / layout.FINGERPRINT) or {}
        if isinstance(record.get("settings"), dict):
            out[stage] = record["settings"]
    return out


def _shown(value: Any) -> bool:
    return value is not None and value != [] and value != {}


# Settings a pair strategy does not use: a rewrite runs no captioner, a caption strategy no LLM.
_UNUSED = {"rewrite": {"caption_model", "caption_max_new_tokens"}, "caption": {"model", "backend", "template"}}


def models_and_thresholds(settings: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, Any]]:
    """(stage, "model" or "threshold", setting, value) for the settings that say what built the data."""
    rows = []
    for stage, values in settings.items():
        unused = _UNUSED.get(values.get("strategy"), set()) if stage == "pair" else set()
        for key, value in values.items():
            if not _shown(value) or _PACING_KEYS.search(key) or key in unused:
                continue
            if _MODEL_KEYS.match(key):
                rows.append((stage, "model", key, value))
            elif _THRESHOLD_KEYS.search(key) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
                rows.append((stage, "threshold", key, value))
    return rows


def row_models(files: list[Path]) -> dict[str, Counter[str]]:
    """How many rows name each narrative origin and CLIP model (`narrative_origin`, `clip_model`)."""
    found: dict[str, Counter[str]] = {"narrative_origin": Counter(), "clip_model": Counter()}
    for path in files:
        pf = pq.ParquetFile(path)
        columns = [c for c in found if c in pf.schema_arrow.names]
        if not columns:
            continue
        table = pf.read(columns=columns)
        for column in columns:
            found[column].update(v for v in table.column(column).to_pylist() if v)
    return found


def score_cutoff(run_dir: Path) -> float | None:
    """The whole-run percentile cutoff the score stage applied: the same percentile over the same scores."""
    import numpy as np

    percentile = stage_settings(run_dir).get("score", {}).get("min_narrative_percentile")
    if percentile is None:
        return None
    values = clip_values(run_dir)["clip_narrative"]
    return float(np.percentile([v for v, _ in values], percentile)) if values else None


def clip_values(run_dir: Path) -> dict[str, list[tuple[float, bool]]]:
    """Every CLIP score the score stage wrote, kept and dropped: {column: [(value, kept), ...]}."""
    stage_dir = layout.stage_dir(run_dir, "score")
    out: dict[str, list[tuple[float, bool]]] = {"clip_keyword": [], "clip_narrative": []}
    if not stage_dir.is_dir():
        return out
    columns = list(out)
    sources = [(True, shards.read_stage(stage_dir, columns=columns)), (False, shards.read_dropped(stage_dir, columns))]
    for kept, batches in sources:
        for batch in batches:
            for column in out:
                if column in batch.schema.names:
                    out[column] += [(v, kept) for v in batch.column(column).to_pylist() if v is not None]
    return out


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!? ")


def shared_narratives(files: list[Path]) -> list[tuple[str, list[int]]]:
    """Narratives that rows with different keyword prompts share: (narrative, positions of its rows), most rows first.

    Rows with the same keyword prompt may share a narrative (one prompt, several seeds); rows asking for different
    pictures should not: a template's example copied, or a model that says the same thing about everything.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    prompts: dict[str, set[str]] = defaultdict(set)
    texts: dict[str, str] = {}
    position = 0
    for path in files:
        pf = pq.ParquetFile(path)
        if "narrative_prompt" not in pf.schema_arrow.names:
            position += pf.metadata.num_rows
            continue
        columns = [c for c in ("narrative_prompt", "keyword_prompt") if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(columns=columns, batch_size=4096):
            has_keywords = "keyword_prompt" in columns
            keywords = batch.column("keyword_prompt").to_pylist() if has_keywords else [None] * len(batch)
            for narrative, keyword in zip(batch.column("narrative_prompt").to_pylist(), keywords, strict=True):
                if narrative:
                    key = _normal(narrative)
                    groups[key].append(position)
                    prompts[key].add(keyword or "")
                    texts.setdefault(key, narrative)
                position += 1
    shared = [(texts[k], positions) for k, positions in groups.items() if len(prompts[k]) > 1]
    return sorted(shared, key=lambda item: (-len(item[1]), item[0]))
