"""The Ray executor writes exactly what the local executor writes, and runs move between the two mid-way.

One local Ray instance (2 CPUs, temp files and HOME redirected) is shared by the whole module; the `surd run`
subprocesses join it with `--address`, so they do not pay Ray's start-up again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'surd[ray]')")

from pipelines.ray import actor_pool_size, run_recipe_ray, run_stage_ray, uses_actors  # noqa: E402
from pipelines.recipe import load_recipe  # noqa: E402
from pipelines.registry import stage_config  # noqa: E402
from pipelines.run import run_recipe  # noqa: E402
from surd import shards  # noqa: E402
from surd.demo import make_bench_images, make_demo_data  # noqa: E402
from surd.errors import StageError, SurdError  # noqa: E402
from surd.layout import FINGERPRINT  # noqa: E402
from surd.rows import StageConfig  # noqa: E402

STAGES = ("collect", "clean", "dedup", "export")


class SetupOnce:
    """A model-like processor: `setup()` loads once per worker; each row records which worker and how many setups."""

    def __init__(self) -> None:
        self.setups = 0

    def setup(self) -> None:
        self.setups += 1
        self.pid = os.getpid()

    def process_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**row, "narrative_origin": f"{self.pid}:{self.setups}"} for row in rows]


class SetupOnceConfig(StageConfig):
    def build(self) -> SetupOnce:
        return SetupOnce()


class ThreadCount:
    """A model-like processor that records how many threads torch computes with in the worker."""

    def setup(self) -> None:
        import torch  # noqa: F401  # a model stage's setup loads torch

    def process_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import torch

        return [{**row, "narrative_origin": str(torch.get_num_threads())} for row in rows]


class ThreadCountConfig(StageConfig):
    def build(self) -> ThreadCount:
        return ThreadCount()


class MissingModel(SetupOnce):
    def setup(self) -> None:
        raise StageError("score: model folder /nowhere/model not found")


class MissingModelConfig(StageConfig):
    def build(self) -> MissingModel:
        return MissingModel()


class FailsOnRow:
    """Stateless processor that raises a user error on one row (runs as plain Ray tasks)."""

    def __init__(self, bad_id: str) -> None:
        self.bad_id = bad_id

    def process_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in rows:
            if row["id"] == self.bad_id:
                raise StageError(f"row {row['id']}: cannot score")
        return rows


class FailsOnRowConfig(StageConfig):
    bad_id: str

    def build(self) -> FailsOnRow:
        return FailsOnRow(self.bad_id)


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Iterator[str]:
    # A short path: Ray's socket paths live under the temp dir and must stay under ~107 characters.
    root = Path(tempfile.mkdtemp(prefix="surd-ray-"))
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(root / "home")  # Ray writes ~/.ray (auth token, logs); keep it out of the real HOME
    # Test-only processors are shipped to the workers by value (the workers cannot import this test module).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(root / "tmp"), logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if old_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old_home
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo images plus small generated ones, 3 rows a shard: dozens of shards, so kills land mid-stage."""
    root = tmp_path_factory.mktemp("ray-workload")
    make_demo_data(root / "images" / "demo")
    make_bench_images(root / "images" / "bench", 90, seed=2)
    path = root / "recipe.yaml"
    path.write_text(
        f"name: ray-demo\ncollect:\n  - type: folder\n    path: {root / 'images'}\n    rows_per_shard: 3\n"
        "clean:\n  num_cpus: 0.5\ndedup:\n  num_cpus: 0.5\nexport:\n  test_fraction: 0.2\n"
    )
    return path


@pytest.fixture(scope="module")
def reference(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    assert run_recipe(load_recipe(recipe, out), out, progress=False) == list(STAGES)
    return out


def _no_seconds(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_no_seconds(v) for v in value]
    return value


def _digest(out: Path, stages: tuple[str, ...] = STAGES[:-1]) -> dict[str, Any]:
    """Everything a run leaves, row for row and shard for shard, minus wall-clock times."""
    digest: dict[str, Any] = {}
    for stage in stages:
        folder = out / stage
        names = shards.shard_names(folder)
        kept = {rel: pq.read_table(shards.shard_path(folder, rel)).to_pylist() for rel in names}
        dropped = {rel: pq.read_table(shards.dropped_path(folder, rel)).to_pylist() for rel in names}
        ids = [r["id"] for rows in kept.values() for r in rows]
        assert len(ids) == len(set(ids)), f"duplicate kept ids in {stage}"
        digest[stage] = {
            "kept": kept,
            "dropped": dropped,
            "stats": {rel: _no_seconds(json.loads(shards.stats_path(folder, rel).read_text())) for rel in names},
            "markers": sorted(str(p.relative_to(folder)) for p in (folder / "_done").rglob("*") if p.is_file()),
            "manifest": _no_seconds(shards.read_manifest(folder)),
            "input": json.loads((folder / FINGERPRINT).read_text()) if stage != "collect" else None,
        }
    data = out / "surd" / "data"
    digest["export"] = {
        "files": {p.name: pq.read_table(p).to_pylist() for p in sorted(data.glob("*.parquet"))},
        "manifest": _no_seconds(shards.read_manifest(out / "export")),
    }
    return digest


def _assert_same(actual: Any, expected: Any, where: str = "run") -> None:
    """Equality with the path of the first difference in the message (the digests hold image bytes)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        assert actual.keys() == expected.keys(), f"{where}: keys differ: {actual.keys() ^ expected.keys()}"
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, list) and isinstance(actual, list):
        assert len(actual) == len(expected), f"{where}: {len(actual)} items, expected {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {str(actual)[:200]} != {str(expected)[:200]}"


def _markers(out: Path, stage: str) -> int:
    done = out / stage / "_done"
    return sum(1 for p in done.rglob("*") if p.is_file()) if done.is_dir() else 0


def _start(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "surd", "run", str(recipe), "--out", str(out), "-q", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})


def _kill_when(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the kill point: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("run did not reach the kill point")


def _mid_clean(out: Path) -> bool:
    return _markers(out, "clean") >= 3 and not (out / "clean" / shards.MANIFEST).exists()


def test_ray_run_equals_local_run_row_for_row(recipe: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_recipe_ray(load_recipe(recipe, out), out, progress=False) == list(STAGES)
    expected = _digest(reference)
    assert len(expected["clean"]["kept"]) >= 30  # enough shards to spread over workers
    assert sum(len(v) for v in expected["dedup"]["dropped"].values()) > 0  # the plan (dedup) mattered
    _assert_same(_digest(out), expected)


def test_ray_run_killed_mid_stage_resumes_with_local_executor(
    recipe: Path, reference: Path, ray_instance: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    _kill_when(_start(recipe, out, "--executor", "ray", "--address", ray_instance), lambda: _mid_clean(out))
    # Killed mid-way (tasks already running may still finish: they write whole shards, like a resumed run).
    assert not (out / "clean" / shards.MANIFEST).exists()
    run_recipe(load_recipe(recipe, out), out, progress=False)
    _assert_same(_digest(out), _digest(reference))


def test_local_run_killed_mid_stage_resumes_with_ray_executor(recipe: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _kill_when(_start(recipe, out), lambda: _mid_clean(out))
    assert 3 <= _markers(out, "clean") < len(shards.shard_names(out / "collect"))
    run_recipe_ray(load_recipe(recipe, out), out, progress=False)
    _assert_same(_digest(out), _digest(reference))
    assert not list(out.rglob(".*.tmp")), "temp files left behind"


def test_model_stage_runs_in_an_actor_pool_set_up_once_per_actor(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "dedup", run_dir / "dedup")
    config = SetupOnceConfig(batch_size=2, num_cpus=0.25)
    assert uses_actors(config, config.build())
    stats = run_stage_ray(run_dir, "score", config, progress=False, max_actors=2)
    rows = shards.read_stage_table(run_dir / "score").to_pylist()
    expected_ids = shards.read_stage_table(reference / "dedup", columns=["id"]).column("id").to_pylist()
    assert [r["id"] for r in rows] == expected_ids
    assert stats["in"] == stats["kept"] == len(expected_ids)
    workers = {r["narrative_origin"] for r in rows}
    pids = {w.split(":")[0] for w in workers}
    assert all(w.endswith(":1") for w in workers), f"setup ran more than once in a worker: {workers}"
    assert 1 <= len(pids) <= 2 and str(os.getpid()) not in pids
    assert len(shards.shard_names(run_dir / "score")) > len(pids)  # actors were reused across shards


def test_a_model_stage_computes_with_the_same_threads_on_every_executor(reference: Path, tmp_path: Path) -> None:
    """Another thread count sums floats in another order, and a sampling LLM then writes other words (#11, 9)."""
    import torch

    from pipelines.local import run_stage

    before = torch.get_num_threads()
    seen = {}
    for name, run in (("serial", lambda d: run_stage(d, "pair", ThreadCountConfig(num_cpus=1), progress=False)),
                      ("pool", lambda d: run_stage(d, "pair", ThreadCountConfig(num_cpus=1), workers=2,
                                                   progress=False)),
                      ("ray", lambda d: run_stage_ray(d, "pair", ThreadCountConfig(num_cpus=1), progress=False,
                                                      max_actors=2))):
        run_dir = tmp_path / name
        shutil.copytree(reference / "dedup", run_dir / "dedup")
        run(run_dir)
        seen[name] = set(shards.read_stage_table(run_dir / "pair").column("narrative_origin").to_pylist())
    assert seen == {"serial": {"1"}, "pool": {"1"}, "ray": {"1"}}
    assert torch.get_num_threads() == before  # the parent's own count is given back


def test_user_error_in_a_worker_surfaces_as_surd_error(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "dedup", run_dir / "dedup")
    bad = shards.read_stage_table(reference / "dedup", columns=["id"]).column("id")[5].as_py()
    config = FailsOnRowConfig(bad_id=bad, num_cpus=0.5)
    assert not uses_actors(config, config.build())
    with pytest.raises(StageError, match=f"row {bad}: cannot score"):
        run_stage_ray(run_dir, "score", config, progress=False)
    assert not (run_dir / "score" / shards.MANIFEST).exists()
    with pytest.raises(StageError, match="model folder /nowhere/model not found"):
        run_stage_ray(run_dir, "pair", MissingModelConfig(num_cpus=0.25), progress=False, max_actors=1)
    assert not shards.shard_names(run_dir / "pair")


def test_placement_rule_and_pool_size() -> None:
    clean = stage_config("clean", {})
    assert not uses_actors(clean, clean.build())
    gpu = stage_config("clean", {"num_gpus": 0.5})
    assert uses_actors(gpu, gpu.build())
    assert actor_pool_size("score", gpu, 10, {"CPU": 8.0, "GPU": 2.0}) == 4
    assert actor_pool_size("score", gpu, 3, {"CPU": 8.0, "GPU": 2.0}) == 3
    with pytest.raises(StageError, match="num_gpus=0.5"):
        actor_pool_size("score", gpu, 10, {"CPU": 8.0})
    with pytest.raises(StageError, match="num_cpus=4"):
        actor_pool_size("clean", stage_config("clean", {"num_cpus": 4}), 10, {"CPU": 2.0})


def test_object_storage_run_folder_is_refused_clearly(recipe: Path) -> None:
    with pytest.raises(SurdError, match="object storage"):
        run_recipe_ray(load_recipe(recipe, Path("/tmp/unused")), Path("s3://bucket/run"), progress=False)


DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "recipes" / "demo.yaml"


@pytest.mark.slow
def test_the_demo_recipe_with_its_model_stages_agrees_with_the_local_run(tmp_path: Path) -> None:
    """nsfw (open_nsfw), pair (SmolLM2) and score (CLIP, run-level percentile) on Ray give the local run's rows."""
    local = tmp_path / "local"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "surd", "run", str(DEMO), "--out", str(local), "--until", "export",
                           "-q"], capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    # The Ray run starts from the local run's early stages (the same fingerprints: paths are kept as ${out}/...),
    # so what runs on Ray is the model stages and export; the pair cache is not copied, so every answer is new.
    remote = tmp_path / "ray"
    for part in ("demo-images", "models", "collect", "clean", "dedup"):
        shutil.copytree(local / part, remote / part)
    run_recipe_ray(load_recipe(DEMO, remote), remote, progress=False)
    model_stages = ("nsfw", "pair", "score")
    assert all(json.loads((remote / s / "_fingerprint.json").read_text())["settings"] ==
               json.loads((local / s / "_fingerprint.json").read_text())["settings"] for s in model_stages)
    expected = _digest(local, model_stages)
    assert sum(r["clip_narrative"] is not None for r in expected["score"]["kept"]["folder/part-00000"]) > 0
    _assert_same(_digest(remote, model_stages), expected)
    assert _exported(remote) == _exported(local)


def _exported(out: Path) -> list[dict[str, Any]]:
    files = sorted((out / "surd" / "data").glob("*.parquet"))
    return [row for path in files for row in pq.read_table(path).to_pylist()]
