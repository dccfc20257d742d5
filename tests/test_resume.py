"""Kill `surd run` with SIGKILL at several points, rerun, and get exactly the uninterrupted result."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from surd import shards
from surd.demo import make_bench_images, make_demo_data

STAGES = ("collect", "clean", "dedup", "export")


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    images = root / "images"
    make_demo_data(images / "demo")
    make_bench_images(images / "bench", 240, seed=1)
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"name: resume\ncollect:\n  - type: folder\n    path: {images}\n    rows_per_shard: 6\n"
        "clean: {}\ndedup: {}\nexport:\n  test_fraction: 0.25\n  shard_size_mb: 0.05\n"
    )
    return recipe


def _start(recipe: Path, out: Path, workers: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "surd", "run", str(recipe), "--out", str(out), "-q", "--workers", str(workers)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})


def _markers(out: Path, stage: str) -> int:
    done = out / stage / "_done"
    return sum(1 for p in done.rglob("*") if p.is_file()) if done.is_dir() else 0


def _export_in_flight(out: Path) -> bool:
    return any(p.name.startswith(".surd.") for p in out.iterdir()) if out.is_dir() else False


def _kill_when(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 240) -> bool:
    """SIGKILL the run as soon as `condition` holds; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("run neither finished nor reached the kill point")


def _snapshot(out: Path) -> dict[str, object]:
    """Everything a resumed run must reproduce: final rows, and every stage's kept/dropped ids."""
    final = []
    for path in sorted((out / "surd" / "data").glob("*.parquet")):
        final += pq.read_table(path).drop_columns(["image"]).to_pylist()
    snap: dict[str, object] = {"final": sorted(final, key=lambda r: r["id"])}
    for stage in STAGES[:-1]:
        kept = shards.read_stage_table(out / stage, columns=["id"]).column("id").to_pylist()
        dropped = [r for b in shards.read_dropped(out / stage, columns=["id", "drop_reason"]) for r in b.to_pylist()]
        assert len(kept) == len(set(kept)), f"duplicate kept ids in {stage}"
        snap[stage] = (sorted(kept), sorted((r["id"], r["drop_reason"]) for r in dropped))
    return snap


@pytest.fixture(scope="module")
def reference(workload: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = _start(workload, out)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode() if proc.stderr else ""
    return _snapshot(out)


def test_sigkill_at_each_stage_then_resume(workload: Path, reference: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    kill_points = [
        ("collect", lambda: _markers(out, "collect") >= 5),
        ("clean", lambda: _markers(out, "clean") >= 7),
        ("dedup", lambda: _markers(out, "dedup") >= 3),
        ("export", lambda: _export_in_flight(out)),
    ]
    killed = []
    for name, condition in kill_points:
        if _kill_when(_start(workload, out), condition):
            killed.append(name)
    assert len(killed) >= 3, f"only killed during {killed}: the workload is too small to test resumption"
    proc = _start(workload, out)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert _snapshot(out) == reference
    assert not list(out.rglob(".*.tmp")), "temp files left behind"


@pytest.mark.parametrize("delays", [(0.8, 1.6, 2.4), (1.1, 2.9)])
def test_sigkill_at_arbitrary_moments_with_two_workers(
    workload: Path, reference: dict, tmp_path: Path, delays: tuple[float, ...]
) -> None:
    out = tmp_path / "out"
    for delay in delays:
        start = time.monotonic()
        _kill_when(_start(workload, out, workers=2), lambda s=start, d=delay: time.monotonic() - s > d)
    proc = _start(workload, out, workers=2)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert _snapshot(out) == reference


def test_copy_of_a_killed_run_resumes_elsewhere(workload: Path, reference: dict, tmp_path: Path) -> None:
    # The run folder is self-contained: moving it between machines mid-run is fine.
    out = tmp_path / "a"
    _kill_when(_start(workload, out), lambda: _markers(out, "clean") >= 2)
    moved = tmp_path / "b"
    shutil.copytree(out, moved)
    proc = _start(workload, moved)
    assert proc.wait(timeout=600) == 0
    assert _snapshot(moved) == reference


def test_a_run_whose_inputs_live_inside_it_is_copied_half_done_and_resumed(
    workload: Path, reference: dict, tmp_path: Path
) -> None:
    # As the demo recipe does: the source folder is `${out}/images`, so what the run records about its
    # settings must not name the folder it was first written to (nor the relative --out it was given).
    recipe = tmp_path / "inside.yaml"
    images = workload.parent / "images"
    recipe.write_text(workload.read_text().replace(f"path: {images}", "path: ${out}/images"))
    shutil.copytree(images, tmp_path / "a" / "images")
    proc = subprocess.Popen(
        [sys.executable, "-m", "surd", "run", str(recipe), "--out", "a", "-q"], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ},
    )
    assert _kill_when(proc, lambda: _markers(tmp_path / "a", "clean") >= 2), "the run ended before the kill point"
    shutil.move(tmp_path / "a", tmp_path / "b")  # the first place is gone: nothing may still point there
    proc = _start(recipe, tmp_path / "b")
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert _snapshot(tmp_path / "b") == reference
    for path in (tmp_path / "b").rglob("*.json"):
        text = path.read_text()
        assert str(tmp_path) not in text, f"{path} names where the run lies: {text[:300]}"


def test_paths_inside_the_run_are_recorded_relative_to_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from surd.layout import portable

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    record = {"path": f"{run}/images", "cache": "run/_cache/pair.sqlite", "same": str(run), "list": [f"{run}2/x"],
              "outside": "/data/images", "n": 3}
    assert portable(record, Path("run")) == {
        "path": "${out}/images", "cache": "${out}/_cache/pair.sqlite", "same": "${out}",
        "list": [f"{run}2/x"],  # a sibling whose name starts like the run's is not inside it
        "outside": "/data/images", "n": 3,
    }


# ---------------------------------------------------------------- the model stages (nsfw, pair, score)

MODEL_STAGES = ("collect", "clean", "dedup", "nsfw", "pair", "score")


def _answer(messages: list[dict[str, str]], body: dict) -> str:
    number = sum(map(ord, messages[-1]["content"])) % 997
    return f"A quiet drawing of {number} small boats near a harbour, version {body['seed']}."


@pytest.fixture(scope="module")
def model_workload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every stage, the model stages included: the packaged open_nsfw, an LLM served on loopback, a tiny CLIP."""
    from openai_server import FakeOpenAI

    from surd.demo.tiny import write_tiny_clip

    root = tmp_path_factory.mktemp("resume-models")
    images = root / "images"
    make_demo_data(images / "demo")
    make_bench_images(images / "bench", 60, seed=4)
    clip = write_tiny_clip(root / "clip")
    with FakeOpenAI(_answer, lifetime_s=1800) as server:
        recipe = root / "recipe.yaml"
        recipe.write_text(
            f"name: resume-models\ncollect:\n  - {{type: folder, path: {images}, rows_per_shard: 4}}\n"
            "clean: {}\ndedup: {}\nnsfw: {mode: flag, batch_size: 4}\n"
            f"pair: {{backend: openai, base_url: '{server.base_url}', model: served, api_key_env: null, k: 2, "
            "batch_size: 4, cache_path: '${out}/_cache/pair.sqlite'}\n"
            f"score: {{model: {clip}, pretrained: null, num_workers: 0, batch_size: 4, min_narrative_percentile: 10}}\n"
            "export: {test_fraction: 0.25}\n"
        )
        yield recipe


def _model_snapshot(out: Path) -> dict[str, object]:
    snap: dict[str, object] = {}
    for stage in MODEL_STAGES:
        rows = shards.read_stage_table(out / stage).drop_columns(["image"]).to_pylist()
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)), f"duplicate kept ids in {stage}"
        dropped = [r for b in shards.read_dropped(out / stage) for r in b.to_pylist()]
        snap[stage] = (sorted(rows, key=lambda r: r["id"]),
                       sorted((r["id"], r["drop_reason"], r["drop_detail"]) for r in dropped))
    final = []
    for path in sorted((out / "surd" / "data").glob("*.parquet")):
        final += pq.read_table(path).drop_columns(["image"]).to_pylist()
    snap["final"] = sorted(final, key=lambda r: r["id"])
    return snap


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_in_each_model_stage_then_resume(model_workload: Path, tmp_path: Path, workers: int) -> None:
    reference = tmp_path / "reference"
    proc = _start(model_workload, reference)
    assert proc.wait(timeout=900) == 0, proc.stderr.read().decode() if proc.stderr else ""
    out = tmp_path / "out"
    killed = []
    for stage in ("nsfw", "pair", "score"):
        if _kill_when(_start(model_workload, out, workers=workers), lambda s=stage: _markers(out, s) >= 2, 600):
            killed.append(stage)
    assert len(killed) >= 2, f"only killed during {killed}"
    proc = _start(model_workload, out, workers=workers)
    assert proc.wait(timeout=900) == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert _model_snapshot(out) == _model_snapshot(reference)
    assert not list(out.rglob(".*.tmp")), "temp files left behind"
