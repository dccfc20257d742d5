"""The run folder itself (issue #11, findings 5, 6 and 10): which folders `--out` accepts, the lock a writer holds,
no pool worker outliving a killed command, and no moment without a dataset while export swaps it.

Every test here runs real processes: two `surd` commands on one run, a command killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.export import exchange, swap_in
from surd.demo import make_bench_images, make_demo_data

SURD = [sys.executable, "-m", "surd"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # a wide console: the CLI's error console wraps at the terminal width (80 columns without a terminal)
    env = {**(env or os.environ), "COLUMNS": "1000"}
    return subprocess.run([*SURD, *args], capture_output=True, text=True, timeout=300, env=env)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recipe that runs for some seconds: demo images plus 240 generated ones, 6 rows a shard."""
    root = tmp_path_factory.mktemp("runfolder")
    images = root / "images"
    make_demo_data(images / "demo")
    make_bench_images(images / "bench", 240, seed=3)
    recipe = root / "recipe.yaml"
    recipe.write_text(f"name: lock\ncollect:\n  - type: folder\n    path: {images}\n    rows_per_shard: 6\n"
                      "clean: {}\ndedup: {}\nexport:\n  test_fraction: 0.25\n")
    return recipe


# ---------------------------------------------------------------- --out


def test_out_refuses_the_root_the_home_folder_and_a_folder_that_is_not_a_run(workload: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    line = _one_line_error(_cli("run", str(workload), "--out", "/", "--dry-run", env=env))
    assert "--out /" in line and "root folder" in line
    line = _one_line_error(_cli("run", str(workload), "--out", str(home), "--dry-run", env=env))
    assert "home folder" in line
    line = _one_line_error(_cli("collect", "folder", str(tmp_path), "--out", str(home), env=env))
    assert "home folder" in line
    theirs = tmp_path / "thesis"
    theirs.mkdir()
    (theirs / "chapter1.tex").write_text("precious")
    line = _one_line_error(_cli("run", str(workload), "--out", str(theirs), env=env))
    assert "not empty and not a surd run folder" in line
    line = _one_line_error(_cli("collect", "folder", str(tmp_path), "--out", str(theirs), env=env))
    assert "not a surd run folder" in line
    assert sorted(p.name for p in theirs.iterdir()) == ["chapter1.tex"]  # nothing written into it
    assert sorted(p.name for p in home.iterdir()) == []
    line = _one_line_error(_cli("clean", str(theirs), env=env))
    assert "not a surd run folder" in line


def test_out_accepts_a_new_or_empty_folder_and_an_earlier_run(workload: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    images = workload.parent / "images" / "demo"
    for out in (tmp_path / "new" / "run", empty, empty):  # the last: a run folder now
        result = _cli("collect", "folder", str(images), "--out", str(out), "-q")
        assert result.returncode == 0, result.stderr


def test_the_root_is_refused_by_the_library_check_too() -> None:
    from pipelines.runfolder import RunFolderError, check_out

    with pytest.raises(RunFolderError, match="root folder"):
        check_out(Path("/"))


def test_a_folder_holding_only_what_the_recipe_places_there_is_accepted(tmp_path: Path) -> None:
    from pipelines.runfolder import RunFolderError, check_out

    out = tmp_path / "run"
    (out / "images").mkdir(parents=True)
    (out / "images" / "a.png").write_bytes(b"x")
    check_out(out, own=[out / "images"])  # the recipe's `${out}/images`: the user put it there for this run
    check_out(out, own=[out / "images" / "a.png"])
    with pytest.raises(RunFolderError, match="not a surd run folder"):
        check_out(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not a surd run folder"):
        check_out(out, own=[out / "images"])  # anything else there is still someone else's


# ---------------------------------------------------------------- the lock


def _holder_pid(run: Path) -> int | None:
    try:
        first = (run / ".surd-lock").read_text().split(" ", 1)[0]
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def _wait(condition, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_second_command_refuses_naming_the_holder_and_a_dead_holder_is_taken_over(
    workload: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    first = subprocess.Popen([*SURD, "run", str(workload), "--out", str(run), "-q"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ})
    try:
        _wait(lambda: _holder_pid(run) == first.pid or first.poll() is not None)
        assert first.poll() is None, "the run ended before the test could use its lock"
        for args in (("clean", str(run), "-q"), ("run", str(workload), "--out", str(run), "-q"),
                     ("export", str(run), "-q")):
            line = _one_line_error(_cli(*args))
            assert f"pid {first.pid}" in line and "in use" in line, line
        assert first.poll() is None  # the refusals did not disturb it
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    assert _holder_pid(run) == first.pid  # the file still names the dead holder; the kernel dropped its lock
    resumed = _cli("run", str(workload), "--out", str(run), "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert "in use" not in resumed.stderr


def test_the_lock_is_released_when_a_command_ends(workload: Path, tmp_path: Path) -> None:
    from pipelines.runfolder import RunLocked, hold

    run = tmp_path / "run"
    result = _cli("collect", "folder", str(workload.parent / "images" / "demo"), "--out", str(run), "-q")
    assert result.returncode == 0, result.stderr
    with hold(run), hold(run):  # this process may take its own lock again (run_recipe inside `surd run`)
        line = _one_line_error(_cli("clean", str(run), "-q"))
        assert f"pid {os.getpid()}" in line
    with hold(run):
        pass
    assert _cli("clean", str(run), "-q").returncode == 0
    with hold(run):
        child = subprocess.run([sys.executable, "-c", (
            "import sys\nfrom pipelines.runfolder import hold\n"
            f"with hold({str(run)!r}): pass\n")], capture_output=True, text=True, env={**os.environ})
    assert child.returncode == 1 and RunLocked.__name__ in child.stderr


# ---------------------------------------------------------------- no orphans


def _children(pid: int) -> set[int]:
    """Every live descendant of `pid` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_pool_workers_exit_when_their_parent_is_killed(workload: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    parent = subprocess.Popen([*SURD, "run", str(workload), "--out", str(run), "-q", "--workers", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    workers: set[int] = set()
    try:
        def pool_started() -> bool:
            workers.update(_children(parent.pid))
            done = run / "clean" / "_done"
            return parent.poll() is not None or (len(workers) >= 2 and done.is_dir() and any(done.rglob("*")))

        _wait(pool_started)
        assert parent.poll() is None, "the run ended before its pool could be killed"
        workers = _children(parent.pid)
        assert len(workers) >= 2
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in workers if _alive(pid)]
        assert not left, f"workers outlived their parent: {left}"
    finally:
        for pid in workers:  # never leave orphans behind, even when the test fails
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------- no gap


def test_swapping_the_dataset_leaves_no_moment_without_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Watch every rename the swap makes (the operating system's, not ours): after each one, is there a dataset?
    target = tmp_path / "surd"
    seen: list[bool] = []
    rename = Path.rename

    def watched(self: Path, to: Path) -> Path:
        result = rename(self, to)
        seen.append(target.exists())
        return result

    monkeypatch.setattr(Path, "rename", watched)
    for i in range(3):
        new = tmp_path / f".surd.{i}"
        new.mkdir()
        (new / "README.md").write_text(str(i))
        swap_in(new, target)
        assert (target / "README.md").read_text() == str(i)
        assert not new.exists()  # the old copy is gone
    assert all(seen), f"a moment without {target}: {seen}"
    assert exchange(tmp_path / "surd", tmp_path / "surd")  # this filesystem swaps atomically (no fallback ran)
