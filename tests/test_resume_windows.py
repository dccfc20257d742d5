"""Stop `surd run` inside a shard's commit (between its files and its marker), rerun, and get the same run.

The kill-9 tests in test_resume.py stop a run after markers appear; these stop it at an exact point of one shard's
commit: right after its kept rows, its dropped rows or its stats are published, before its marker. The process
kills itself (SIGKILL) the moment `os.replace` publishes the chosen file, so the window is hit every time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from surd import shards
from surd.demo import make_bench_images, make_demo_data

STAGES = ("collect", "clean", "dedup")

# Runs `surd run` in this process, SIGKILLing itself right after the `nth` os.replace onto a path whose run-relative
# form starts with `prefix` (os.replace publishes every shard file, stats record and marker).
KILLER = """
import os, signal, sys
from pathlib import Path
out, prefix, nth = Path(sys.argv[2]).resolve(), sys.argv[3], int(sys.argv[4])
real_replace, seen = os.replace, []

def replace(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    rel = Path(os.fspath(dst)).resolve().relative_to(out).as_posix() if out in Path(os.fspath(dst)).resolve().parents \
        else ""
    if rel.startswith(prefix) and not rel.endswith(".tmp"):
        seen.append(rel)
        if len(seen) == nth:
            Path(os.environ["SURD_KILLED_AT"]).write_text(rel)
            os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
from surd.cli import main
sys.argv = ["surd", "run", sys.argv[1], "--out", str(out), "-q", "--workers", "1"]
main()
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("windows")
    make_demo_data(root / "images" / "demo")
    make_bench_images(root / "images" / "bench", 24, seed=2)
    path = root / "recipe.yaml"
    path.write_text(
        f"name: windows\ncollect:\n  - type: folder\n    path: {root / 'images'}\n    rows_per_shard: 5\n"
        "clean: {}\ndedup: {}\nexport:\n  test_fraction: 0.25\n"
    )
    return path


def _run(recipe: Path, out: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "surd", "run", str(recipe), "--out", str(out), "-q"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr


def _killed_run(recipe: Path, out: Path, prefix: str, nth: int, tmp_path: Path) -> str:
    """Run until the `nth` file under `prefix` is published, then SIGKILL; returns that file's run-relative path."""
    killed_at = tmp_path / "killed_at.txt"
    env = {**os.environ, "SURD_KILLED_AT": str(killed_at)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(recipe), str(out), prefix, str(nth)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"the run was not stopped at {prefix} #{nth}: {proc.stderr}"
    return killed_at.read_text()


def _snapshot(out: Path) -> dict[str, object]:
    """What a resumed run must reproduce: final rows, each stage's kept and dropped rows, and its summed stats."""
    final = []
    for path in sorted((out / "surd" / "data").glob("*.parquet")):
        final += pq.read_table(path).drop_columns(["image"]).to_pylist()
    snap: dict[str, object] = {"final": sorted(final, key=lambda r: r["id"])}
    for stage in STAGES:
        kept = shards.read_stage_table(out / stage, columns=["id"]).column("id").to_pylist()
        dropped = [r for b in shards.read_dropped(out / stage, columns=["id", "drop_reason"]) for r in b.to_pylist()]
        stats = shards.stage_stats(out / stage)
        stats.pop("seconds")
        snap[stage] = (sorted(kept), sorted((r["id"], r["drop_reason"]) for r in dropped), stats)
    return snap


@pytest.fixture(scope="module")
def reference(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("reference") / "out"
    _run(recipe, out)
    snap = _snapshot(out)
    clean_kept, clean_dropped, _ = snap["clean"]
    assert clean_kept and clean_dropped, "the workload must keep and drop rows in clean"
    return snap


def _rel_of(published: str, stage: str, folder: str = "") -> str:
    """The shard name of a published file: `clean/_stats/folder/part-00002.json` -> `folder/part-00002`."""
    inner = published[len(stage) + 1 + len(folder):]
    return inner.rsplit(".", 1)[0]


# (what was published last, the folder inside the stage it lives in): each window of one shard's commit.
WINDOWS = [
    pytest.param("", id="after-kept-rows"),
    pytest.param("dropped/", id="after-dropped-rows"),
    pytest.param("_stats/", id="after-stats-before-marker"),
]


@pytest.mark.parametrize("folder", WINDOWS)
def test_kill_inside_a_clean_shard_commit_then_resume(recipe: Path, reference: dict, tmp_path: Path,
                                                      folder: str) -> None:
    out = tmp_path / "out"
    prefix = f"clean/{folder}" if folder else "clean/folder/"
    published = _killed_run(recipe, out, prefix, 3, tmp_path)
    rel = _rel_of(published, "clean", folder)
    stage = out / "clean"
    # The run stopped inside this shard's commit: what was published is there, its marker is not.
    assert shards.shard_path(stage, rel).exists()
    assert shards.dropped_path(stage, rel).exists() == (folder in ("dropped/", "_stats/"))
    assert shards.stats_path(stage, rel).exists() == (folder == "_stats/")
    assert not shards.is_done(stage, rel)
    _run(recipe, out)
    assert _snapshot(out) == reference
    assert shards.is_done(stage, rel)


def test_kill_between_collect_stats_and_marker_then_resume(recipe: Path, reference: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    published = _killed_run(recipe, out, "collect/_stats/", 2, tmp_path)
    rel = _rel_of(published, "collect", "_stats/")
    assert shards.stats_path(out / "collect", rel).exists() and not shards.is_done(out / "collect", rel)
    _run(recipe, out)
    assert _snapshot(out) == reference
