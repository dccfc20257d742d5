"""Runs a source into `<run>/collect/<source name>/part-NNNNN.parquet`, resumably.

Partitioned sources: the partition list is persisted once (`_listing.json`), each partition becomes one
shard with a completion marker, and partitions run in worker processes. Cursor sources: one shard per
page, the raw page kept gzipped in `_raw/`, then the cursor persisted (`_cursor.json`), so a restart
refetches at most the page that was in flight and overwrites its shard.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from pipelines.local import remove_stale_temp_files
from pipelines.progress import progress_bar
from surd import shards
from surd.errors import SourceError
from surd.rows import Drop
from surd.schema import DROPPED_SCHEMA, SCHEMA, from_rows
from surd.sources.base import SourceConfig

STAGE = "collect"


def _config_key(config: SourceConfig) -> str:
    # Options that change what rows a source yields; run options (limits, pacing) may change on resume.
    data = config.model_dump(mode="json", exclude=set(config.RUN_OPTIONS))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _split(items: list[Any], source: str) -> tuple[list[dict], list[dict]]:
    kept, dropped = [], []
    for item in items:
        if isinstance(item, Drop):
            record = dict(item.row or {})
            record.setdefault("id", f"{source}:?")
            record.setdefault("source", source)
            record.update(drop_stage=STAGE, drop_reason=item.reason, drop_detail=item.detail or None)
            dropped.append(record)
        else:
            kept.append(item)
    return kept, dropped


def _commit(stage_dir: Path, rel: str, items: list[Any], source: str, seconds: float) -> dict[str, Any]:
    kept_rows, dropped_rows = _split(items, source)
    kept, dropped = from_rows(kept_rows, SCHEMA), from_rows(dropped_rows, DROPPED_SCHEMA)
    stats = shards.shard_stats(len(items), kept.num_rows, dropped, seconds)
    shards.commit_shard(stage_dir, rel, kept, dropped, stats)
    return stats


def _collect_partition(config: SourceConfig, stage_dir: Path, rel: str, partition: Any) -> dict[str, Any]:
    """Read one partition and commit its shard (in a worker process: rows never travel between processes)."""
    start = time.perf_counter()
    items = list(config.build().read_partition(partition))
    return _commit(stage_dir, rel, items, config.folder, time.perf_counter() - start)


def collect(run_dir: Path, config: SourceConfig, *, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Collect one source into the run folder; returns the collect stage's stats so far."""
    stage_dir = Path(run_dir) / STAGE
    folder = stage_dir / config.folder
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(stage_dir)
    (stage_dir / shards.MANIFEST).unlink(missing_ok=True)
    source = config.build()
    if hasattr(source, "list_partitions"):
        _collect_partitioned(stage_dir, folder, config, source, workers, progress)
    else:
        _collect_cursor(stage_dir, folder, config, source, progress)
    shards.write_manifest(stage_dir, STAGE)
    return shards.stage_stats(stage_dir)


def _collect_partitioned(
    stage_dir: Path, folder: Path, config: SourceConfig, source: Any, workers: int, progress: bool
) -> None:
    listing_path = folder / "_listing.json"
    key = _config_key(config)
    if listing_path.exists():
        listing = json.loads(listing_path.read_text())
        if listing["config"] != key:
            raise SourceError(
                f"{folder} was collected with other source options; use another --out or --name, or delete it"
            )
    else:
        listing = {"config": key, "partitions": source.list_partitions()}
        shards.atomic_write_json(listing_path, listing)
    partitions = listing["partitions"]
    rel = [f"{config.folder}/part-{i:05d}" for i in range(len(partitions))]
    todo = [i for i in range(len(partitions)) if not shards.is_done(stage_dir, rel[i])]
    with progress_bar(f"collect {config.folder}", len(partitions), enabled=progress) as bar:
        if workers <= 1 or len(todo) <= 1:
            for i in todo:
                _collect_partition(config, stage_dir, rel[i], partitions[i])
                bar.advance(1)
            return
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            pending = {pool.submit(_collect_partition, config, stage_dir, rel[i], partitions[i]) for i in todo}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
                    bar.advance(1)


def _collect_cursor(stage_dir: Path, folder: Path, config: SourceConfig, source: Any, progress: bool) -> None:
    state_path = folder / "_cursor.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"cursor": None, "pages": 0, "rows": 0}
    if state.get("config", _config_key(config)) != _config_key(config):
        raise SourceError(f"{folder} was collected with other source options; use another --out or --name")
    max_items = getattr(config, "max_items", None)
    if state.get("finished") or (max_items is not None and state["rows"] >= max_items):
        return
    with progress_bar(f"collect {config.folder}", max_items, enabled=progress) as bar:
        start = time.perf_counter()
        for page in source.pages(state["cursor"]):
            items = list(page.rows)
            if max_items is not None:
                room = max_items - state["rows"]
                kept = [i for i in items if not isinstance(i, Drop)]
                if len(kept) > room:  # cap the run: keep the first `room` usable rows of this page
                    keep_ids = {id(r) for r in kept[:room]}
                    items = [i for i in items if isinstance(i, Drop) or id(i) in keep_ids]
            rel = f"{config.folder}/part-{state['pages']:05d}"
            if page.raw is not None:
                raw_path = folder / "_raw" / f"page-{state['pages']:05d}.json.gz"
                shards.atomic_write_bytes(raw_path, gzip.compress(page.raw))
            stats = _commit(stage_dir, rel, items, config.folder, time.perf_counter() - start)
            start = time.perf_counter()
            state = {
                "config": _config_key(config),
                "cursor": page.next_cursor,
                "pages": state["pages"] + 1,
                "rows": state["rows"] + stats["kept"],
                "finished": page.next_cursor is None,
            }
            shards.atomic_write_json(state_path, state)
            bar.advance(stats["kept"])
            if state["finished"] or (max_items is not None and state["rows"] >= max_items):
                break
