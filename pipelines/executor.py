"""The executor core: the one place that loops over shards, commits them, counts, resumes and fingerprints.

Every pass over a run folder is a *job*: an output folder, the shard names still to do, `setup()` (load models
once per worker) and `run(rel)` (produce one shard and commit it). A stage over the previous stage's shards is
a `StageJob`; collect's partitions (`pipelines.collect`) and the fetch retry pass (`pipelines.retry`) are jobs
too, and export runs as a stage before its finish. `run_job` runs a job serially or in one pool of spawned
workers; the Ray executor maps the same `job.run` over a cluster.

What a job writes for one shard goes through `commit` (kept rows, dropped rows, stats, then the marker last), and
a row's `Drop` becomes a dropped record in `drop_records` alone. What an output folder was built from (input
stage, its shards and fingerprint, the settings that shape the rows) is recorded in `<folder>/_fingerprint.json`
(`pipelines.fingerprint`); `open_stage` compares it with what is asked now and rebuilds the stage, and every stage
after it, when they differ (`invalidate`), saying why in one line.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import fingerprint
from pipelines.progress import notice, progress_bar
from surd import layout, shards
from surd.errors import StageError
from surd.rows import Drop, RowProcessor
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

    def __init__(self, name: str, processor: Any, batch_size: int = 64, threads: int | None = None) -> None:
        self.name = name
        self.processor = processor
        self.batch_size = batch_size
        self.threads = threads  # torch intra-op threads of a model stage, the same on every executor
        self._ready = False

    @property
    def plan_columns(self) -> tuple[str, ...]:
        return tuple(getattr(self.processor, "plan_columns", ()))

    def plan(self, index: Any, rows: int = 0, on_rows: Callable[[int], None] | None = None) -> None:
        """Whole-input decisions, made once in the parent before any batch (e.g. de-duplication)."""
        with _reporting(self.processor, rows, on_rows):
            self.processor.plan(index)

    def setup(self) -> None:
        """Load models once per worker, and pin torch's threads; idempotent."""
        if not self._ready:
            if hasattr(self.processor, "setup"):
                self.processor.setup()
            pin_threads(self.threads)
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
def model_threads(config: Any, processor: Any) -> int | None:
    """How many intra-op threads a model stage computes with: its `num_cpus` (at least 1), on every executor.

    Float sums in another order give other last digits, and a sampling LLM turns those into other words: the same
    rows on the local and the Ray executor need the same thread count (Ray gives an actor `num_cpus` threads).
    Stages without a model of their own (no `setup()`) are left alone.
    """
    setup = getattr(type(processor), "setup", None)
    if setup is None or setup is RowProcessor.setup:
        return None
    return max(1, int(getattr(config, "num_cpus", 1)))


def pin_threads(threads: int | None) -> int | None:
    """Set torch's intra-op threads (if torch is in use); returns the count before, to restore it."""
    if threads is None or "torch" not in sys.modules:
        return None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    return before


@contextmanager
def threads_pinned(threads: int | None) -> Iterator[None]:
    """torch's threads pinned for a block of this process (the parent: plans, a serial run), then restored."""
    if threads is not None and importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401  # a plan loads its model inside the block: pin before it computes
    before = pin_threads(threads)
    try:
        yield
    finally:
        pin_threads(before)


def commit(out: Path, rel: str, kept: pa.Table, dropped: pa.Table, rows_in: int, seconds: float,
           counters: dict[str, int] | None = None) -> dict[str, Any]:
    """Write one shard's kept rows, dropped rows and stats, then its marker (last); returns the stats."""
    stats = shards.shard_stats(rows_in, kept.num_rows, dropped, seconds, counters)
    shards.commit_shard(out, rel, kept, dropped, stats)
    return stats


def discard(run_dir: Path, path: Path) -> None:
    """Remove a folder so that no half-removed copy is ever read: renamed aside first (atomic), then deleted."""
    path = Path(path)
    remove_trash(run_dir)  # what an earlier discard, killed half-way, set aside
    if not path.exists():
        return
    aside = Path(tempfile.mkdtemp(prefix=layout.TRASH_PREFIX, dir=run_dir))
    path.rename(aside / path.name)
    shutil.rmtree(aside, ignore_errors=True)


def remove_trash(run_dir: Path) -> None:
    """Folders a killed `discard` set aside."""
    for path in Path(run_dir).glob(f"{layout.TRASH_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def invalidate(run_dir: Path, stage: str, reason: str, quiet: bool = False, who: str | None = None) -> list[str]:
    """Remove the folders of `stage` and of every later stage (one line says why); returns the stages removed."""
    run_dir = Path(run_dir)
    later = [s for s in layout.STAGES[layout.STAGES.index(stage):] if layout.stage_dir(run_dir, s).exists()]
    if not quiet and later:
        shown = later if who is not None else [stage, *(s for s in later if s != stage)]
        notice(f"{who or stage}: {reason}; rebuilding {', '.join(shown)}")
    for name in later:
        discard(run_dir, layout.stage_dir(run_dir, name))
    return later


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


def check_input(run_dir: Path, stage: str, source: str) -> None:
    """`source` must be a finished stage before `stage`."""
    if not (layout.stage_dir(run_dir, source) / shards.MANIFEST).exists():
        raise StageError(f"{stage}: its input stage {source} is not finished in {run_dir}; run it first")


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


def _exit_with_parent() -> None:
    """In a pool worker: exit as soon as the parent process is gone (killed with -9, nobody tells the pool)."""
    import os

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # waits on the parent's sentinel: returns when the parent process has ended
        os._exit(1)

    threading.Thread(target=watch, name="surd-parent-watch", daemon=True).start()


def _init_worker(job: Job, rows: Any) -> None:
    global _WORKER_JOB, _WORKER_ROWS
    _exit_with_parent()
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
            with threads_pinned(getattr(job, "threads", None)):  # restored for what this process does next
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
    """A processing stage over the previous stage's shards (what `open_stage` prepares).

    `stage` is None when there is nothing left to process (`todo` empty): no model is loaded, no plan is made.
    """

    name: str
    stage: Stage | None
    source: str
    src: Path
    out: Path
    todo: list[str] = field(default_factory=list)
    up_to_date: bool = False  # finished before, with the same fingerprint: nothing to do, nothing to write

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"{self.name} ({self.source} -> {self.name})"

    @property
    def threads(self) -> int | None:
        return self.stage.threads if self.stage is not None else None

    def setup(self) -> None:
        assert self.stage is not None
        self.stage.setup()

    def size(self, rel: str) -> int:
        return pq.read_metadata(shards.shard_path(self.src, rel)).num_rows

    def run(self, rel: str, on_rows: Callable[[int], None] | None = None) -> dict[str, Any]:
        assert self.stage is not None
        return process_shard(self.stage, self.src, self.out, rel, on_rows)

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the manifest (the stage is complete) and return its total stats."""
        if not self.up_to_date:
            shards.write_manifest(self.out, self.name, extra={"input_stage": self.source, **(extra or {})})
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


def open_stage(run_dir: Path, name: str, config: Any, processor: Any = None, source: str | None = None,
               settings: dict[str, Any] | None = None, progress: bool = False) -> StageJob:
    """Check the input and the fingerprint, clean up after a killed run, build the processor and plan.

    Shared by every executor. `source`: the input stage (default: the latest finished one before `name`);
    `processor` replaces `config.build()` (export's review applier); `settings` replaces the fingerprinted
    settings of `config` (export adds its reviews); `progress` shows a bar while a plan that reports rows
    (score's whole-run percentile) runs. A folder built from other settings or another input is rebuilt, with
    every later stage; a finished folder with the same fingerprint is left as it is.
    """
    run_dir = Path(run_dir)
    if source is None:
        source = input_stage(run_dir, name)
    check_input(run_dir, name, source)
    src, out = layout.stage_dir(run_dir, source), layout.stage_dir(run_dir, name)
    names = shards.shard_names(src)
    if settings is None:
        settings = fingerprint.settings_of(name, config, run_dir)
    record = fingerprint.record(name, settings, fingerprint.input_of(run_dir, source))
    state = fingerprint.state(out, record, len(names))
    if state.action == "done":
        return StageJob(name, None, source, src, out, [], up_to_date=True)
    if state.action == "rebuild":
        invalidate(run_dir, name, state.reason)
    elif state.action == "new":  # later stages were built from an earlier copy of this one: rebuild them too
        invalidate(run_dir, name, "its folder is missing, so the stages after it are stale")
    out.mkdir(parents=True, exist_ok=True)
    if state.action != "continue":
        fingerprint.write(out, record)
    remove_stale_temp_files(out)
    todo = [rel for rel in names if not shards.is_done(out, rel)]
    if not todo:
        return StageJob(name, None, source, src, out, [])
    (out / shards.MANIFEST).unlink(missing_ok=True)
    processor = processor if processor is not None else config.build()
    stage = Stage(name, processor, batch_size=config.batch_size, threads=model_threads(config, processor))
    if stage.plan_columns:
        columns = list(stage.plan_columns)
        with threads_pinned(stage.threads):
            if getattr(stage.processor, "plan_streaming", False):  # plans over all images: don't hold them at once
                index: Any = shards.read_stage(src, columns=columns)
            else:
                index = shards.read_stage_table(src, columns=columns)
            total = sum(pq.read_metadata(shards.shard_path(src, rel)).num_rows for rel in names)
            with progress_bar(f"{name}: plan over {source}", total,
                              enabled=progress and hasattr(stage.processor, "on_rows")) as bar:
                stage.plan(index, total, bar.advance)
    return StageJob(name, stage, source, src, out, todo)
