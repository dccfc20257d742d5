"""Runs a source into `<run>/collect/<source name>/part-NNNNN.parquet`, resumably, through the executor.

Each source folder records its settings (`_fingerprint.json`, `pipelines.fingerprint`; options that only bound or
pace a source, its `RUN_OPTIONS`, are left out). A source collected with other settings is rebuilt: its folder,
then every stage after collect. Partitioned sources: the partition list is persisted once (`_listing.json`) and
each partition becomes one shard of a `PartitionJob`, run by the executor's worker pool. Cursor sources: one
shard per page, the raw page kept gzipped in `_raw/`, then the cursor persisted (`_cursor.json`, with every
cursor seen), so a restart refetches at most the page that was in flight and overwrites its shard. A cursor seen
before, or a page holding nothing but rows already collected, ends the paging with a warning (a cycle).

One id, one row: when every shard is in, `drop_repeated_ids` keeps the first row of each id in shard order
(source folders by name, then shards, then rows) and moves every later one to `dropped/` as `duplicate_id`.
Then `collect/_fingerprint.json` records the sources, and the manifest says the stage is complete.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import fingerprint
from pipelines.executor import Job, commit, discard, drop_records, invalidate, remove_stale_temp_files, run_job
from pipelines.progress import notice, progress_bar
from surd import layout, shards
from surd.rows import Drop
from surd.schema import DROPPED_SCHEMA, SCHEMA, from_rows
from surd.sources.base import SourceConfig

STAGE = "collect"
LISTING, CURSOR = "_listing.json", "_cursor.json"


def source_record(config: SourceConfig, run_dir: Path) -> dict[str, Any]:
    """What a source folder is built from: the source's type and the options that change what rows it yields."""
    return {"source": config.type,
            "settings": fingerprint.settings_of(STAGE, config, run_dir, exclude=frozenset(config.RUN_OPTIONS))}


def source_state(run_dir: Path, config: SourceConfig) -> fingerprint.State:
    """Where one source's folder stands: new, rebuild (other settings), continue, or done."""
    folder = layout.stage_dir(run_dir, STAGE) / config.folder
    if not folder.is_dir() or not any(folder.iterdir()):
        return fingerprint.State("new")
    why = fingerprint.difference(fingerprint.read(folder), source_record(config, run_dir))
    if why is not None:
        return fingerprint.State("rebuild", why)
    done = sum(1 for p in (folder.parent / "_done" / config.folder).rglob("*") if p.is_file()) \
        if (folder.parent / "_done" / config.folder).is_dir() else 0
    if (folder / LISTING).exists():
        total = len(json.loads((folder / LISTING).read_text())["partitions"])
        if done >= total:
            return fingerprint.State("done")
        return fingerprint.State("continue", f"{done} of {total} shards done", done)
    if (folder / CURSOR).exists():
        state = json.loads((folder / CURSOR).read_text())
        max_items = getattr(config, "max_items", None)
        if state.get("finished") or (max_items is not None and state["rows"] >= max_items):
            return fingerprint.State("done")
        return fingerprint.State("continue", f"{state['pages']} pages, {state['rows']} rows so far", done)
    return fingerprint.State("continue", "started", done)


def collect_record(run_dir: Path) -> dict[str, Any]:
    """The collect stage's own record: every source folder's record, by folder name."""
    stage_dir = layout.stage_dir(run_dir, STAGE)
    sources = {}
    for folder in sorted(p for p in stage_dir.iterdir() if p.is_dir()) if stage_dir.is_dir() else []:
        record = fingerprint.read(folder)
        if record is not None and not folder.name.startswith(("_", ".")) and folder.name != "dropped":
            sources[folder.name] = record
    return {"stage": STAGE, "sources": sources}


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
    run_dir = Path(run_dir)
    stage_dir = layout.stage_dir(run_dir, STAGE)
    folder = stage_dir / config.folder
    state = source_state(run_dir, config)
    if state.action == "done" and (stage_dir / shards.MANIFEST).exists() \
            and fingerprint.read(stage_dir) == collect_record(run_dir):
        return shards.stage_stats(stage_dir)
    if state.action == "rebuild":
        remove_source(run_dir, config.folder, state.reason)
    elif state.action != "done":  # stages after collect were built without these rows: rebuild them
        later = [s for s in layout.STAGES[1:] if layout.stage_dir(run_dir, s).exists()]
        if later:
            what = "a new source" if state.action == "new" else "collecting more rows"
            invalidate(run_dir, later[0], what, who=f"collect {config.folder}")
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(stage_dir)
    (stage_dir / shards.MANIFEST).unlink(missing_ok=True)
    if state.action != "continue":
        fingerprint.write(folder, source_record(config, run_dir))
    if state.action != "done":
        source = config.build()
        if hasattr(source, "list_partitions"):
            _collect_partitioned(stage_dir, folder, config, source, workers, progress)
        else:
            _collect_cursor(stage_dir, folder, config, source, progress)
    finish(run_dir)
    return shards.stage_stats(stage_dir)


def finish(run_dir: Path) -> None:
    """Every source is in: one row per id, then the collect stage's record and manifest (complete)."""
    stage_dir = layout.stage_dir(run_dir, STAGE)
    drop_repeated_ids(stage_dir)
    fingerprint.write(stage_dir, collect_record(run_dir))
    shards.write_manifest(stage_dir, STAGE)


def remove_source(run_dir: Path, name: str, reason: str) -> None:
    """Remove one source's folder (its shards, dropped rows, stats, markers) and every stage after collect."""
    stage_dir = layout.stage_dir(run_dir, STAGE)
    later = [s for s in layout.STAGES[1:] if layout.stage_dir(run_dir, s).exists()]
    notice(f"collect {name}: {reason}; rebuilding {', '.join([f'collect/{name}', *later])}")
    (stage_dir / shards.MANIFEST).unlink(missing_ok=True)
    # markers first, the folder with its fingerprint last: a removal cut short is never read as finished shards
    for part in (stage_dir / "_done" / name, stage_dir / "_stats" / name, stage_dir / "dropped" / name,
                 stage_dir / name):
        discard(run_dir, part)
    if later:
        invalidate(run_dir, later[0], reason, quiet=True)


def prune_sources(run_dir: Path, keep: list[str]) -> None:
    """Remove source folders a recipe no longer lists (their rows would otherwise flow on silently)."""
    stage_dir = layout.stage_dir(run_dir, STAGE)
    if not stage_dir.is_dir():
        return
    for folder in sorted(p for p in stage_dir.iterdir() if p.is_dir() and (p / layout.FINGERPRINT).exists()):
        if folder.name not in keep:
            remove_source(run_dir, folder.name, "not in the recipe any more")


def _collect_partitioned(
    stage_dir: Path, folder: Path, config: SourceConfig, source: Any, workers: int, progress: bool
) -> None:
    listing_path = folder / LISTING
    if listing_path.exists():
        partitions = json.loads(listing_path.read_text())["partitions"]
    else:
        partitions = source.list_partitions()
        shards.atomic_write_json(listing_path, {"partitions": partitions})
    job = PartitionJob(config, stage_dir, {f"{config.folder}/part-{i:05d}": p for i, p in enumerate(partitions)})
    run_job(job, workers=workers, progress=progress, unit="shards")


def _source_ids(stage_dir: Path, name: str) -> set[str]:
    """Ids already committed by one source (kept rows), so a resumed crawl recognises repeats."""
    seen: set[str] = set()
    for rel in shards.shard_names(stage_dir / name):
        seen.update(pq.read_table(shards.shard_path(stage_dir, f"{name}/{rel}"), columns=["id"]).column(0).to_pylist())
    return seen


def _collect_cursor(stage_dir: Path, folder: Path, config: SourceConfig, source: Any, progress: bool) -> None:
    state_path = folder / CURSOR
    state = json.loads(state_path.read_text()) if state_path.exists() else {"cursor": None, "pages": 0, "rows": 0}
    max_items = getattr(config, "max_items", None)
    if state.get("finished") or (max_items is not None and state["rows"] >= max_items):
        return
    cursors = set(state.get("cursors", [])) | {state["cursor"]}
    seen = _source_ids(stage_dir, config.folder)
    with progress_bar(f"collect {config.folder}", max_items, enabled=progress) as bar:
        start = time.perf_counter()
        for page in source.pages(state["cursor"]):
            items, repeats = _first_of_each_id(list(page.rows), seen)
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
            seen.update(row["id"] for row in items if not isinstance(row, Drop))
            start = time.perf_counter()
            cycle = _cycle(page.next_cursor, cursors, repeats, stats["kept"])
            if cycle:
                notice(f"collect {config.folder}: {cycle}; stopping with the {state['rows'] + stats['kept']} rows "
                       "collected so far")
            state = {
                "cursor": page.next_cursor,
                "cursors": sorted(c for c in cursors | {page.next_cursor} if c is not None),
                "pages": state["pages"] + 1,
                "rows": state["rows"] + stats["kept"],
                "finished": page.next_cursor is None or bool(cycle),
            }
            cursors.add(page.next_cursor)
            shards.atomic_write_json(state_path, state)
            bar.advance(stats["kept"])
            if state["finished"] or (max_items is not None and state["rows"] >= max_items):
                break


def _first_of_each_id(items: list[Any], seen: set[str]) -> tuple[list[Any], int]:
    """A page's items with rows whose id was already collected (earlier pages or rows) turned into Drops."""
    out, repeats, here = [], 0, set()
    for item in items:
        if not isinstance(item, Drop) and (item["id"] in seen or item["id"] in here):
            out.append(Drop("duplicate_id", f"id {item['id']} was collected earlier by this source", row=item))
            repeats += 1
            continue
        if not isinstance(item, Drop):
            here.add(item["id"])
        out.append(item)
    return out, repeats


def _cycle(next_cursor: str | None, cursors: set[str | None], repeats: int, kept: int) -> str:
    """Why paging must stop although the API offers another page ('' if it need not)."""
    if next_cursor is not None and repeats and not kept:
        return f"a page held only rows collected before ({repeats}), so the API is repeating itself"
    if next_cursor is not None and next_cursor in cursors:
        return f"the API returned cursor {next_cursor!r} again (a cycle)"
    return ""


# ---------------------------------------------------------------- one id, one row


def drop_repeated_ids(stage_dir: Path) -> int:
    """Move every row whose id appeared earlier (shard order, then row order) to dropped/ as `duplicate_id`.

    A shard is rewritten dropped rows first, kept rows next, stats last; its stats still describe the shard as it
    was until the rewrite is complete, so a rewrite cut short is recognised (more dropped rows than the stats
    count, or fewer kept ones) and finished on the next run. Returns the number of rows moved.
    """
    first: dict[str, str] = {}
    moved = 0
    for rel in shards.shard_names(stage_dir):
        stats = json.loads(shards.stats_path(stage_dir, rel).read_text())
        ids = pq.read_table(shards.shard_path(stage_dir, rel), columns=["id"]).column(0).to_pylist()
        repeats = []
        for i, sample_id in enumerate(ids):
            if sample_id in first:
                repeats.append(i)
            else:
                first[sample_id] = rel
        recorded = sum(stats["dropped"].values())
        cut_short = len(ids) != stats["kept"] or pq.read_metadata(shards.dropped_path(stage_dir, rel)).num_rows \
            != recorded
        if repeats or cut_short:
            moved += len(repeats)
            _rewrite_without(stage_dir, rel, repeats, first, stats, rewritten=len(ids) != stats["kept"])
    return moved


def _rewrite_without(stage_dir: Path, rel: str, repeats: list[int], first: dict[str, str], stats: dict[str, Any],
                     rewritten: bool) -> None:
    kept = shards.read_table(shards.shard_path(stage_dir, rel)).cast(SCHEMA)
    dropped = shards.read_table(shards.dropped_path(stage_dir, rel)).cast(DROPPED_SCHEMA)
    if not rewritten:  # kept rows not yet rewritten: any extra dropped rows are an earlier attempt's; redo them
        dropped = dropped.slice(0, sum(stats["dropped"].values()))
        rows = kept.take(pa.array(repeats, pa.int64())).to_pylist()
        drops = [Drop("duplicate_id", f"id {row['id']} is already a row of collect/{first[row['id']]}", row=row)
                 for row in rows]
        _, records = drop_records(drops, STAGE)
        dropped = pa.concat_tables([dropped, from_rows(records, DROPPED_SCHEMA)])
        gone = set(repeats)
        mask = pa.array([i not in gone for i in range(kept.num_rows)])
        shards.write_table(shards.dropped_path(stage_dir, rel), dropped)
        kept = kept.filter(mask)
        shards.write_table(shards.shard_path(stage_dir, rel), kept)
    new = shards.shard_stats(stats["in"], kept.num_rows, dropped, stats.get("seconds", 0.0), stats.get("counters"))
    shards.atomic_write_json(shards.stats_path(stage_dir, rel), new)


def discard_collect(run_dir: Path) -> None:
    """Remove the whole collect stage (`--from collect`)."""
    discard(run_dir, layout.stage_dir(run_dir, STAGE))
