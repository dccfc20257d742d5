"""The executor core: the one place that loops over shards, commits them, counts, resumes and fingerprints.

Every pass over a run folder is a *job*: an output folder, the shard names still to do, `setup()` (load models
once per worker) and `run(rel)` (produce one shard and commit it). A stage over the previous stage's shards is
a `StageJob`; collect's partitions (`pipelines.collect`) and the fetch retry pass (`pipelines.retry`) are jobs
too, and export runs as a stage before its finish. `run_job` runs a job serially or in one pool of spawned
workers; the Ray executor maps the same `job.run` over a cluster.

What a job writes for one shard goes through `commit` (kept rows, dropped rows, stats, then the marker last), and
a row's `Drop` becomes a dropped record in `drop_records` alone. What an output folder was built from (input
stage and shards, settings) is recorded once, in `<folder>/_fingerprint.json` (`check_fingerprint`).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.progress import progress_bar
from surd import layout, shards
from surd.errors import StageError, SurdError
from surd.rows import Drop
from surd.schema import DROPPED_SCHEMA, SCHEMA, from_rows


def drop_records(items: list[Any], stage: str, inputs: list[dict[str, Any]] | None = None,
                 defaults: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split results into kept rows and dropped records (the row, plus drop_stage / drop_reason / drop_detail).

    `inputs[i]` is the row `items[i]` came from (a Drop records it unless it carries its own row); `defaults`
    fill columns a dropped record lacks (e.g. a source's name for a row that never became one).
    """
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if not isinstance(item, Drop):
            kept.append(item)
            continue
        record = dict(item.row if item.row is not None else (inputs[i] if inputs is not None else {}))
        for key, value in (defaults or {}).items():
            record.setdefault(key, value)
        record.update(drop_stage=stage, drop_reason=item.reason, drop_detail=item.detail or None)
        dropped.append(record)
    return kept, dropped


class Stage:
    """A named processor (see `surd.rows`) as the executors call it: Table batch -> (kept, dropped) Tables."""

    def __init__(self, name: str, processor: Any, batch_size: int = 64) -> None:
        self.name = name
        self.processor = processor
        self.batch_size = batch_size
        self._ready = False

    @property
    def plan_columns(self) -> tuple[str, ...]:
        return tuple(getattr(self.processor, "plan_columns", ()))

    def plan(self, index: Any, rows: int = 0, on_rows: Callable[[int], None] | None = None) -> None:
        """Whole-input decisions, made once in the parent before any batch (e.g. de-duplication)."""
        with _reporting(self.processor, rows, on_rows):
            self.processor.plan(index)

    def setup(self) -> None:
        """Load models once per worker; idempotent."""
        if not self._ready:
            if hasattr(self.processor, "setup"):
                self.processor.setup()
            self._ready = True

    def take_side_tables(self) -> dict[str, pa.Table]:
        """Side outputs the processor produced since the last call (e.g. embeddings), by name."""
        take = getattr(self.processor, "take_side_tables", None)
        return dict(take()) if take is not None else {}

    def counters(self) -> dict[str, int]:
        return dict(getattr(self.processor, "counters", {}) or {})

    def __call__(self, batch: pa.Table, on_rows: Callable[[int], None] | None = None) -> tuple[pa.Table, pa.Table]:
        """Run the processor over one batch; `on_rows(n)` hears of finished rows (all of them by the end)."""
        self.setup()
        rows = batch.to_pylist()
        with _reporting(self.processor, len(rows), on_rows) as reported:
            results = self.processor.process_batch(rows)
        if len(results) != len(rows):
            raise RuntimeError(f"stage {self.name}: processor returned {len(results)} results for {len(rows)} rows")
        if on_rows is not None and len(rows) > reported[0]:
            on_rows(len(rows) - reported[0])
        kept, dropped = drop_records(results, self.name, inputs=rows)
        return from_rows(kept, SCHEMA), from_rows(dropped, DROPPED_SCHEMA)


@contextmanager
def _reporting(processor: Any, rows: int, on_rows: Callable[[int], None] | None) -> Iterator[list[int]]:
    """Lend a processor that declares `on_rows` (surd.rows) a callback for rows finished inside a long batch.

    Yields [rows reported]; reports are capped at the batch's rows, and the callback is taken back afterwards
    (a processor is pickled to workers between batches).
    """
    reported = [0]
    if on_rows is None or not hasattr(processor, "on_rows"):
        yield reported
        return

    def report(n: int) -> None:
        n = min(n, rows - reported[0])
        if n > 0:
            reported[0] += n
            on_rows(n)

    processor.on_rows = report
    try:
        yield reported
    finally:
        processor.on_rows = None


def commit(out: Path, rel: str, kept: pa.Table, dropped: pa.Table, rows_in: int, seconds: float,
           counters: dict[str, int] | None = None) -> dict[str, Any]:
    """Write one shard's kept rows, dropped rows and stats, then its marker (last); returns the stats."""
    stats = shards.shard_stats(rows_in, kept.num_rows, dropped, seconds, counters)
    shards.commit_shard(out, rel, kept, dropped, stats)
    return stats


def check_fingerprint(folder: Path, record: dict[str, Any], error: type[SurdError],
                      message: Callable[[dict[str, Any]], str]) -> None:
    """Record what `folder` is built from, or refuse (`error(message(previous))`) if it was built from another."""
    path = Path(folder) / layout.FINGERPRINT
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != record:
            raise error(message(previous))
    else:
        shards.atomic_write_json(path, record)


def remove_stale_temp_files(folder: Path) -> None:
    """Temp files left by a killed writer (names start with '.' and end with '.tmp')."""
    if folder.is_dir():
        for tmp in folder.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def input_stage(run_dir: Path, stage: str) -> str:
    """The latest stage before `stage` (in data-flow order) whose folder is complete."""
    for prev in reversed(layout.STAGES[: layout.STAGES.index(stage)]):
        if (layout.stage_dir(run_dir, prev) / shards.MANIFEST).exists():
            return prev
    raise StageError(f"{stage}: no finished earlier stage in {run_dir}; run `surd collect ... --out {run_dir}` first")


class Job:
    """One pass over a run folder's shards: `setup()` once per worker, then `run(rel)` per shard to do."""

    label: str = ""
    out: Path
    todo: list[str]

    def setup(self) -> None:
        pass

    def run(self, rel: str, on_rows: Callable[[int], None] | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def size(self, rel: str) -> int:
        """Progress units of one shard (rows for a stage)."""
        return 1

    def total(self) -> int:
        return sum(self.size(rel) for rel in self.todo)


_WORKER_JOB: Job | None = None
_WORKER_ROWS: Any = None  # a shared counter of rows finished, read by the parent's progress bar


def _init_worker(job: Job, rows: Any) -> None:
    global _WORKER_JOB, _WORKER_ROWS
    _WORKER_JOB, _WORKER_ROWS = job, rows
    job.setup()


def _count_rows(n: int) -> None:
    with _WORKER_ROWS.get_lock():
        _WORKER_ROWS.value += n


def _run_in_worker(rel: str) -> dict[str, Any]:
    assert _WORKER_JOB is not None
    return _WORKER_JOB.run(rel, on_rows=_count_rows)


def run_job(job: Job, workers: int = 1, progress: bool = True, unit: str = "rows") -> None:
    """Run every shard of `job` still to do: in this process, or in `workers` spawned worker processes.

    With `unit="rows"` the bar moves as rows finish (`job.run` reports them through `on_rows`, from worker
    processes through a shared counter); with another unit it moves by `job.size(rel)` per finished shard.
    """
    if not job.todo:
        return
    rows = unit == "rows"
    with progress_bar(job.label, job.total(), enabled=progress, unit=unit) as bar:
        if workers <= 1 or len(job.todo) <= 1:
            job.setup()
            for rel in job.todo:
                job.run(rel, on_rows=bar.advance if rows else None)
                if not rows:
                    bar.advance(job.size(rel))
            return
        # spawn, not fork: model stages hold torch/onnx thread pools that do not survive a fork.
        context = multiprocessing.get_context("spawn")
        finished = context.Value("q", 0)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(job, finished)) as pool:
            pending = {pool.submit(_run_in_worker, rel): rel for rel in job.todo}
            while pending:
                done, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                for future in done:
                    rel = pending.pop(future)
                    future.result()
                    if not rows:
                        bar.advance(job.size(rel))
                if rows:
                    bar.advance(finished.value - bar.done)


@dataclass
class StageJob(Job):
    """A processing stage over the previous stage's shards (what `open_stage` prepares)."""

    name: str
    stage: Stage
    source: str
    src: Path
    out: Path
    todo: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"{self.name} ({self.source} -> {self.name})"

    def setup(self) -> None:
        self.stage.setup()

    def size(self, rel: str) -> int:
        return pq.read_metadata(shards.shard_path(self.src, rel)).num_rows

    def run(self, rel: str, on_rows: Callable[[int], None] | None = None) -> dict[str, Any]:
        return process_shard(self.stage, self.src, self.out, rel, on_rows)

    def close(self) -> dict[str, Any]:
        """Write the manifest (the stage is complete) and return its total stats."""
        shards.write_manifest(self.out, self.name, extra={"input_stage": self.source})
        return shards.stage_stats(self.out)


def process_shard(stage: Stage, src: Path, out: Path, rel: str, on_rows: Any = None) -> dict[str, Any]:
    """Run `stage` over one input shard and commit its outputs; returns the shard's stats."""
    start = time.perf_counter()
    stage.take_side_tables()  # leftovers of a shard that failed in this worker belong to no shard
    before = stage.counters()
    kept_parts: list[pa.Table] = []
    dropped_parts: list[pa.Table] = []
    n_in = 0
    for batch in pq.ParquetFile(shards.shard_path(src, rel)).iter_batches(batch_size=stage.batch_size):
        kept, dropped = stage(pa.Table.from_batches([batch]), on_rows)
        kept_parts.append(kept)
        dropped_parts.append(dropped)
        n_in += batch.num_rows
    kept = pa.concat_tables(kept_parts) if kept_parts else SCHEMA.empty_table()
    dropped = pa.concat_tables(dropped_parts) if dropped_parts else DROPPED_SCHEMA.empty_table()
    after = stage.counters()
    counters = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    # Side outputs (e.g. saved embeddings) land before the marker, so a done shard always has them.
    for side_name, table in stage.take_side_tables().items():
        shards.write_table(shards.side_path(out, side_name, rel), table)
    return commit(out, rel, kept, dropped, n_in, time.perf_counter() - start, counters)


def open_stage(run_dir: Path, name: str, config: Any, processor: Any = None, fresh: bool = False,
               progress: bool = False) -> StageJob:
    """Check the input, clean up after a killed run, build the processor and plan; shared by every executor.

    `processor` replaces `config.build()` (export's review applier); `fresh` discards earlier output first;
    `progress` shows a bar while a plan that reports rows (score's whole-run percentile) runs.
    """
    run_dir = Path(run_dir)
    source = input_stage(run_dir, name)
    src, out = layout.stage_dir(run_dir, source), layout.stage_dir(run_dir, name)
    names = shards.shard_names(src)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    check_fingerprint(out, {"input_stage": source, "shards": names}, StageError, lambda previous: (
        f"{out} was produced from a different input ({previous['input_stage']}, {len(previous['shards'])} shards); "
        f"delete {out} to rebuild this stage"))
    remove_stale_temp_files(out)
    stage = Stage(name, processor if processor is not None else config.build(), batch_size=config.batch_size)
    if stage.plan_columns:
        columns = list(stage.plan_columns)
        if getattr(stage.processor, "plan_streaming", False):  # plans over all images: don't hold them at once
            index: Any = shards.read_stage(src, columns=columns)
        else:
            index = shards.read_stage_table(src, columns=columns)
        total = sum(pq.read_metadata(shards.shard_path(src, rel)).num_rows for rel in names)
        with progress_bar(f"{name}: plan over {source}", total,
                          enabled=progress and hasattr(stage.processor, "on_rows")) as bar:
            stage.plan(index, total, bar.advance)
    todo = [rel for rel in names if not shards.is_done(out, rel)]
    if todo:
        (out / shards.MANIFEST).unlink(missing_ok=True)
    return StageJob(name, stage, source, src, out, todo)
