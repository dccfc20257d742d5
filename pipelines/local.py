"""Local executor: runs a stage shard by shard, resumable, optionally in N worker processes.

For each input shard `<prev>/<rel>.parquet` it writes `<stage>/<rel>.parquet`, `dropped/<rel>.parquet`,
`_stats/<rel>.json` and, last, the marker `_done/<rel>` (see `surd.shards`). A rerun skips shards whose
marker exists, so a run killed at any moment resumes with nothing lost and nothing duplicated.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.progress import progress_bar
from pipelines.stage import Stage
from pipelines.stages import ORDER
from surd import shards
from surd.errors import StageError
from surd.schema import DROPPED_SCHEMA, SCHEMA

INPUT_FILE = "_input.json"


def input_stage(run_dir: Path, stage: str) -> str:
    """The latest stage before `stage` (in data-flow order) whose folder is complete."""
    for prev in reversed(ORDER[: ORDER.index(stage)]):
        if (Path(run_dir) / prev / shards.MANIFEST).exists():
            return prev
    raise StageError(f"{stage}: no finished earlier stage in {run_dir}; run `surd collect ... --out {run_dir}` first")


def remove_stale_temp_files(folder: Path) -> None:
    """Temp files left by a killed writer (names start with '.' and end with '.tmp')."""
    if folder.is_dir():
        for tmp in folder.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _check_input(out: Path, source: str, names: list[str]) -> None:
    """A stage folder belongs to one input; resuming against another input would mix runs."""
    path = out / INPUT_FILE
    record = {"input_stage": source, "shards": names}
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != record:
            raise StageError(
                f"{out} was produced from a different input ({previous['input_stage']}, "
                f"{len(previous['shards'])} shards); delete {out} to rebuild this stage"
            )
    else:
        shards.atomic_write_json(path, record)


def process_shard(stage: Stage, src: Path, out: Path, rel: str, on_rows: Any = None) -> dict[str, Any]:
    """Run `stage` over one input shard and commit its outputs; returns the shard's stats."""
    start = time.perf_counter()
    stage.take_side_tables()  # leftovers of a shard that failed in this worker belong to no shard
    before = stage.counters()
    kept_parts: list[pa.Table] = []
    dropped_parts: list[pa.Table] = []
    n_in = 0
    for batch in pq.ParquetFile(shards.shard_path(src, rel)).iter_batches(batch_size=stage.batch_size):
        kept, dropped = stage(pa.Table.from_batches([batch]))
        kept_parts.append(kept)
        dropped_parts.append(dropped)
        n_in += batch.num_rows
        if on_rows is not None:
            on_rows(batch.num_rows)
    kept = pa.concat_tables(kept_parts) if kept_parts else SCHEMA.empty_table()
    dropped = pa.concat_tables(dropped_parts) if dropped_parts else DROPPED_SCHEMA.empty_table()
    after = stage.counters()
    counters = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    stats = shards.shard_stats(n_in, kept.num_rows, dropped, time.perf_counter() - start, counters)
    # Side outputs (e.g. saved embeddings) land before the marker, so a done shard always has them.
    for side_name, table in stage.take_side_tables().items():
        shards.write_table(shards.side_path(out, side_name, rel), table)
    shards.commit_shard(out, rel, kept, dropped, stats)
    return stats


_WORKER_STAGE: Stage | None = None


def _init_worker(stage: Stage) -> None:
    global _WORKER_STAGE
    _WORKER_STAGE = stage
    stage.setup()


def _run_in_worker(src: Path, out: Path, rel: str) -> dict[str, Any]:
    assert _WORKER_STAGE is not None
    return process_shard(_WORKER_STAGE, src, out, rel)


@dataclass
class OpenStage:
    """A stage ready to run: its input and output folders and the input shards not done yet."""

    name: str
    stage: Stage
    source: str
    src: Path
    out: Path
    todo: list[str]

    def rows_todo(self) -> int:
        return sum(pq.read_metadata(shards.shard_path(self.src, rel)).num_rows for rel in self.todo)

    def close(self) -> dict[str, Any]:
        """Write the manifest (the stage is complete) and return its total stats."""
        shards.write_manifest(self.out, self.name, extra={"input_stage": self.source})
        return shards.stage_stats(self.out)


def open_stage(run_dir: Path, name: str, config: Any) -> OpenStage:
    """Check the input, clean up after a killed run, build the processor and plan; shared by every executor."""
    run_dir = Path(run_dir)
    source = input_stage(run_dir, name)
    src, out = run_dir / source, run_dir / name
    names = shards.shard_names(src)
    out.mkdir(parents=True, exist_ok=True)
    _check_input(out, source, names)
    remove_stale_temp_files(out)
    stage = Stage(name, config.build(), batch_size=config.batch_size)
    if stage.plan_columns:
        columns = list(stage.plan_columns)
        if getattr(stage.processor, "plan_streaming", False):  # plans over all images: don't hold them at once
            stage.plan(shards.read_stage(src, columns=columns))
        else:
            stage.plan(shards.read_stage_table(src, columns=columns))
    todo = [rel for rel in names if not shards.is_done(out, rel)]
    if todo:
        (out / shards.MANIFEST).unlink(missing_ok=True)
    return OpenStage(name, stage, source, src, out, todo)


def run_stage(
    run_dir: Path, name: str, config: Any, *, workers: int = 1, progress: bool = True
) -> dict[str, Any]:
    """Run one processing stage over the previous stage's shards; returns the stage's total stats."""
    job = open_stage(run_dir, name, config)
    with progress_bar(f"{name} ({job.source} -> {name})", job.rows_todo(), enabled=progress) as bar:
        if workers <= 1 or len(job.todo) <= 1:
            for rel in job.todo:
                process_shard(job.stage, job.src, job.out, rel, on_rows=bar.advance)
        else:
            _run_pool(job.stage, job.src, job.out, job.todo, workers, bar)
    return job.close()


def _run_pool(stage: Stage, src: Path, out: Path, todo: list[str], workers: int, bar: Any) -> None:
    # spawn, not fork: model stages hold torch/onnx thread pools that do not survive a fork.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(stage,)) as pool:
        pending = {pool.submit(_run_in_worker, src, out, rel) for rel in todo}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                bar.advance(future.result()["in"])
