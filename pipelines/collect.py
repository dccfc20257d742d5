"""Runs a source into `<run>/collect/<source name>/part-NNNNN.parquet`, resumably, through the executor.

The source's settings are fingerprinted (`_fingerprint.json`): resuming with other options is refused.
Partitioned sources: the partition list is persisted once (`_listing.json`) and each partition becomes one
shard of a `PartitionJob`, run by the executor's worker pool. Cursor sources: one shard per page, the raw page
kept gzipped in `_raw/`, then the cursor persisted (`_cursor.json`), so a restart refetches at most the page
that was in flight and overwrites its shard.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any

from pipelines.executor import Job, check_fingerprint, commit, drop_records, remove_stale_temp_files, run_job
from pipelines.progress import progress_bar
from surd import layout, shards
from surd.errors import SourceError
from surd.rows import Drop
from surd.schema import DROPPED_SCHEMA, SCHEMA, from_rows
from surd.sources.base import SourceConfig

STAGE = "collect"


def _fingerprint(config: SourceConfig, run_dir: Path) -> dict[str, Any]:
    # Options that change what rows a source yields; run options (limits, pacing) may change on resume.
    # A source inside the run (the demo's images) is recorded as `${out}/...`: a copied run resumes elsewhere.
    settings = config.model_dump(mode="json", exclude=set(config.RUN_OPTIONS))
    return {"source": config.type, "settings": layout.portable(settings, run_dir)}


def _commit(stage_dir: Path, rel: str, items: list[Any], source: str, seconds: float) -> dict[str, Any]:
    kept, dropped = drop_records(items, STAGE, defaults={"id": f"{source}:?", "source": source})
    return commit(stage_dir, rel, from_rows(kept, SCHEMA), from_rows(dropped, DROPPED_SCHEMA), len(items), seconds)


class PartitionJob(Job):
    """Collect's partitions as an executor job: one partition -> one shard `collect/<source>/part-NNNNN`."""

    def __init__(self, config: SourceConfig, stage_dir: Path, partitions: dict[str, Any]) -> None:
        self.config, self.out, self.partitions = config, stage_dir, partitions
        self.todo = [rel for rel in partitions if not shards.is_done(stage_dir, rel)]
        self.label = f"collect {config.folder}"
        self._source: Any = None

    def setup(self) -> None:
        if self._source is None:
            self._source = self.config.build()

    def run(self, rel: str, on_rows: Any = None) -> dict[str, Any]:
        """Read one partition and commit its shard (in a worker process: rows never travel between processes)."""
        self.setup()
        start = time.perf_counter()
        items = list(self._source.read_partition(self.partitions[rel]))
        return _commit(self.out, rel, items, self.config.folder, time.perf_counter() - start)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}  # each worker builds its own source


def collect(run_dir: Path, config: SourceConfig, *, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Collect one source into the run folder; returns the collect stage's stats so far."""
    stage_dir = layout.stage_dir(run_dir, STAGE)
    folder = stage_dir / config.folder
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(stage_dir)
    (stage_dir / shards.MANIFEST).unlink(missing_ok=True)
    check_fingerprint(folder, _fingerprint(config, run_dir), SourceError, lambda _: (
        f"{folder} was collected with other source options; use another --out or --name, or delete it"))
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
    if listing_path.exists():
        partitions = json.loads(listing_path.read_text())["partitions"]
    else:
        partitions = source.list_partitions()
        shards.atomic_write_json(listing_path, {"partitions": partitions})
    job = PartitionJob(config, stage_dir, {f"{config.folder}/part-{i:05d}": p for i, p in enumerate(partitions)})
    run_job(job, workers=workers, progress=progress, unit="shards")


def _collect_cursor(stage_dir: Path, folder: Path, config: SourceConfig, source: Any, progress: bool) -> None:
    state_path = folder / "_cursor.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"cursor": None, "pages": 0, "rows": 0}
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
                "cursor": page.next_cursor,
                "pages": state["pages"] + 1,
                "rows": state["rows"] + stats["kept"],
                "finished": page.next_cursor is None,
            }
            shards.atomic_write_json(state_path, state)
            bar.advance(stats["kept"])
            if state["finished"] or (max_items is not None and state["rows"] >= max_items):
                break
