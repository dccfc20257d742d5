"""Ray executor: the local executor's stages and shard layout, spread over a Ray cluster with Ray Data.

The unit of work is one input shard, as in the local executor: Ray Data gets one item per shard still to
do, and a task or actor runs the stage job's `run(rel)` on it (`pipelines.executor`), which reads the shard,
runs the stage batch by batch and commits kept rows, dropped rows, stats and (last) the marker. So a Ray run
writes exactly the folder the local executor writes, either executor resumes the other's run, and a retried
task just rewrites the same files atomically. Every node must see the run folder at the same path (docs/cluster.md).

Where a stage runs (its recipe section's `num_cpus` / `num_gpus` are reserved per task or actor):
- an actor pool (`ActorPoolStrategy`, 1 to N actors) when the stage asks for GPUs (`num_gpus > 0`) or its
  processor defines `setup()` (a model loaded once per worker): each actor sets up once, then takes shards;
- plain tasks otherwise (stateless row logic such as clean and dedup).
Collect and export run in the driver with the local code (sources page through cursors; export writes one
dataset); whole-input plans (dedup) are made once in the driver and shipped with the stage.
Progress moves row by row as on the local executor: workers report finished rows to a small counter actor that
the driver polls.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

import surd.errors
from pipelines.executor import StageJob, open_stage
from pipelines.plan import nothing_to_do, plan_run
from pipelines.progress import progress_bar
from pipelines.recipe import Recipe
from pipelines.run import check_until, run_recipe
from surd.errors import StageError, SurdError
from surd.rows import RowProcessor

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/")


def uses_actors(config: Any, processor: Any) -> bool:
    """The placement rule: actors for GPU stages and for processors that load something in `setup()`."""
    setup = getattr(type(processor), "setup", None)
    return config.num_gpus > 0 or (setup is not None and setup is not RowProcessor.setup)


def actor_pool_size(name: str, config: Any, shards_todo: int, resources: dict[str, float]) -> int:
    """Most actors the cluster can hold at the stage's per-actor CPUs/GPUs, and no more than there are shards."""
    fits = int(resources.get("CPU", 0.0) // config.num_cpus)
    if config.num_gpus > 0:
        fits = min(fits, int(resources.get("GPU", 0.0) // config.num_gpus))
    if fits < 1:
        raise StageError(
            f"{name}: the recipe asks for num_cpus={config.num_cpus}, num_gpus={config.num_gpus} per worker, but the "
            f"Ray cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs; lower "
            f"`{name}: {{num_cpus: ..., num_gpus: ...}}` in the recipe or use a bigger cluster"
        )
    return max(1, min(fits, shards_todo))


class _RowCounter:
    """A Ray actor counting rows finished inside shards, so the driver's bar moves row by row, not per shard."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def count(self) -> int:
        return self.rows


def _process(job: StageJob, batch: pa.Table, counter: Any = None) -> pa.Table:
    """Run the job over the shards named in `batch`; user errors come back as data (Ray drops their type)."""
    rels = batch.column("rel").to_pylist()
    rows_in, errors = [], []
    on_rows = None if counter is None else (lambda n: counter.add.remote(n))  # fire and forget: never waits
    for rel in rels:
        try:
            rows_in.append(job.run(rel, on_rows=on_rows)["in"])
            errors.append(None)
        except SurdError as e:
            rows_in.append(0)
            errors.append(f"{type(e).__name__}:{e}")
    return _results(rels, rows_in, errors)


def _results(rels: list[str], rows_in: list[int], errors: list[str | None]) -> pa.Table:
    return pa.table({"rel": rels, "in": pa.array(rows_in, pa.int64()), "error": pa.array(errors, pa.string())})


def _shard_task(batch: pa.Table, job: StageJob, counter: Any = None) -> pa.Table:
    return _process(job, batch, counter)


class _ShardActor:
    """One model-stage worker: sets the stage up once, then processes the shards Ray Data sends it."""

    def __init__(self, job: StageJob, counter: Any = None) -> None:
        self.job, self.counter = job, counter
        self.error: str | None = None
        try:
            job.setup()
        except SurdError as e:  # e.g. a model that is not there: report it per shard, not as an actor crash
            self.error = f"{type(e).__name__}:{e}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.error is not None:
            rels = batch.column("rel").to_pylist()
            return _results(rels, [0] * len(rels), [self.error] * len(rels))
        return _process(self.job, batch, self.counter)


def _raise_worker_error(message: str) -> None:
    kind, _, text = message.partition(":")
    cls = getattr(surd.errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, SurdError)):
        cls = StageError
    raise cls(text)


def _map_shards(job: StageJob, config: Any, max_actors: int | None, counter: Any = None) -> Any:
    """The Ray Data pipeline: one item per shard to do, mapped by tasks or an actor pool (the placement rule)."""
    import ray
    import ray.data

    args = {"job": job, "counter": counter}
    items = ray.data.from_items([{"rel": rel} for rel in job.todo], override_num_blocks=len(job.todo))
    size = actor_pool_size(job.name, config, len(job.todo), ray.cluster_resources())  # fails early, never hangs
    if not uses_actors(config, job.stage.processor):
        return items.map_batches(
            _shard_task, batch_size=1, batch_format="pyarrow", fn_kwargs=args, num_cpus=config.num_cpus
        )
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=min(size, max_actors or size))
    return items.map_batches(
        _ShardActor, batch_size=1, batch_format="pyarrow", compute=pool, fn_constructor_kwargs=args,
        num_cpus=config.num_cpus, num_gpus=config.num_gpus or None,
    )


def run_stage_ray(
    run_dir: Path, name: str, config: Any, *, progress: bool = True, max_actors: int | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Run one processing stage over its input stage's shards on Ray; returns the stage's total stats."""
    job = open_stage(run_dir, name, config, source=source, progress=progress)
    if job.todo:
        import ray

        counter = ray.remote(num_cpus=0)(_RowCounter).remote() if progress else None
        done = _map_shards(job, config, max_actors, counter)
        with progress_bar(f"{job.label}, ray", job.total(), enabled=progress) as bar, _polling(counter, bar):
            # Leaving the loop early (first user error) stops the dataset: no more shards are started.
            for result in done.iter_batches(batch_size=None, batch_format="pyarrow"):
                for error in result.column("error").drop_null().to_pylist():
                    _raise_worker_error(error)
    return job.close()


@contextmanager
def _polling(counter: Any, bar: Any, every: float = 0.25) -> Iterator[None]:
    """Move `bar` to the counter's rows every `every` seconds while the block runs, and once at its end; the
    counter actor is gone afterwards, however the block ends."""
    if counter is None:
        yield
        return
    import ray

    stop = threading.Event()

    def catch_up() -> None:
        bar.advance(max(0, ray.get(counter.count.remote()) - bar.done))

    def poll() -> None:
        while not stop.wait(every):
            catch_up()

    thread = threading.Thread(target=poll, name="surd-ray-rows", daemon=True)
    thread.start()
    try:
        try:
            yield
        finally:
            stop.set()
            thread.join()
        catch_up()  # only after a block that finished: a failed stage's bar stays where it was
    finally:
        ray.kill(counter)


def _run_dir(out: Path) -> Path:
    """The run folder as an absolute local path: workers on other nodes open the same path."""
    if _URL.match(str(out)) or "://" in str(out):
        raise SurdError(
            f"--out {out}: the Ray executor writes the run folder with local file operations; object storage "
            "URLs are not supported yet. Use a shared filesystem mounted at the same path on every node "
            "(see docs/cluster.md)"
        )
    return Path(out).expanduser().resolve()


def _connect(address: str | None) -> bool:
    """Join (or start) a Ray cluster unless this process already has one; True if we must shut it down."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # one progress bar style: ours
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled" notice
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise SurdError(f"--address {address}: cannot connect to a Ray cluster: {e}") from None
    return True


def _check_shared(run_dir: Path) -> None:
    """Every node with CPUs must see the run folder, or shards would be written where nobody reads them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # A folder named like export's temp folders, so one left by a killed run is cleaned up by the next export.
    probe = Path(tempfile.mkdtemp(prefix=".surd-ray-probe-", dir=run_dir))
    try:
        @ray.remote(num_cpus=0)
        def sees(path: str) -> bool:
            return os.path.exists(path)

        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")]
        checks = {
            n["NodeManagerAddress"]: sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(probe))
            for n in nodes
        }
        blind = [addr for addr, ref in checks.items() if not ray.get(ref)]
    finally:
        probe.rmdir()
    if blind:
        raise SurdError(
            f"--out {run_dir}: Ray nodes {', '.join(blind)} cannot see this folder; put the run folder on a "
            "filesystem shared by every node, mounted at the same path (see docs/cluster.md)"
        )


def run_recipe_ray(
    recipe: Recipe, out: Path, *, until: str | None = None, address: str | None = None, reviews: Any = None,
    progress: bool = True, collect_workers: int = 1, max_actors: int | None = None, rebuild_from: str | None = None,
) -> list[str]:
    """Run the recipe's stages into `out` on Ray (collect and export in this process); returns the stages run."""
    import ray

    check_until(until)
    run_dir = _run_dir(out)
    if rebuild_from is None and nothing_to_do(plan_run(recipe, run_dir, until=until, reviews=reviews)):
        return run_recipe(recipe, run_dir, until=until, reviews=reviews, progress=progress)  # no cluster for nothing
    run_dir.mkdir(parents=True, exist_ok=True)
    started = _connect(address)
    try:
        _check_shared(run_dir)
        runner = partial(run_stage_ray, max_actors=max_actors)
        return run_recipe(
            recipe, run_dir, workers=collect_workers, until=until, reviews=reviews, progress=progress,
            stage_runner=runner, rebuild_from=rebuild_from,
        )
    finally:
        if started:
            ray.shutdown()
