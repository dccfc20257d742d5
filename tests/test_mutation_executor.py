"""What mutation testing found untested in shard I/O, the executor and fingerprints: thread counts, plan progress,
discarding folders, the rebuild notice, a worker's side of the pool (called here in process), the umask."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_shards_executor import _Config as _EveryConfig

from pipelines import executor, fingerprint
from pipelines.executor import (
    Job,
    Stage,
    StageJob,
    commit,
    discard,
    invalidate,
    model_threads,
    open_stage,
    remove_trash,
    run_job,
)
from surd import layout, shards
from surd.errors import StageError
from surd.rows import Drop, RowProcessor, StageConfig
from surd.schema import DROPPED_SCHEMA, from_rows


def _finished(run: Path, *rels: str) -> None:
    for rel in rels:
        commit(layout.stage_dir(run, "collect"), rel, from_rows([{"id": f"{rel}-{k}"} for k in range(4)]),
               shards.empty_dropped(), 4, 0.1)
    shards.write_manifest(layout.stage_dir(run, "collect"), "collect")


class _Model(RowProcessor):
    def setup(self) -> None:  # a stage with a model of its own
        pass


class _Config:
    def __init__(self, num_cpus: float) -> None:
        self.num_cpus = num_cpus


def test_model_threads_only_for_stages_with_their_own_setup() -> None:
    assert model_threads(_Config(3.7), _Model()) == 3  # whole threads
    assert model_threads(_Config(0.5), _Model()) == 1  # at least one
    assert model_threads(_Config(2), RowProcessor()) is None  # the inherited no-op setup: no model
    assert model_threads(_Config(2), object()) is None  # no setup at all
    assert model_threads(object(), _Model()) == 1  # no num_cpus: one


class _Planner:
    on_rows = None

    def __init__(self) -> None:
        self.seen_callback: Any = None

    def plan(self, index: Any) -> None:
        self.seen_callback = self.on_rows
        if self.on_rows is not None:
            self.on_rows(5)
            self.on_rows(5)  # more than the rows: capped

    def process_batch(self, rows: list[dict]) -> list[dict]:
        return rows


def test_plan_progress_is_lent_capped_and_taken_back() -> None:
    processor = _Planner()
    calls: list[int] = []
    Stage("dedup", processor).plan(None, 7, calls.append)
    assert calls == [5, 2] and processor.seen_callback is not None and processor.on_rows is None
    Stage("dedup", processor).plan(None, on_rows=calls.append)  # rows unknown (0): nothing to report
    assert calls == [5, 2]
    Stage("dedup", processor).plan(None, 7)
    assert processor.seen_callback is None  # nobody listens: no callback lent


def test_discard_leaves_no_trash_and_remove_trash_finishes_a_killed_one(tmp_path: Path) -> None:
    (tmp_path / "clean" / "s").mkdir(parents=True)
    (tmp_path / "clean" / "s" / "x.parquet").write_bytes(b"x")
    killed = tmp_path / f"{layout.TRASH_PREFIX}old"  # what a discard killed before its rmtree left
    (killed / "clean").mkdir(parents=True)
    (tmp_path / "keep").mkdir()
    discard(tmp_path, tmp_path / "clean")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    (killed / "dedup").mkdir(parents=True)
    remove_trash(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    discard(tmp_path, tmp_path / "missing")  # nothing to do


def test_invalidate_says_what_it_rebuilds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert invalidate(tmp_path, "clean", "why") == []
    assert capsys.readouterr().err == ""  # nothing removed: nothing said
    for stage in ("dedup", "nsfw"):
        (tmp_path / stage).mkdir()
    # the stage itself is named first even when its folder is gone (its later stages are rebuilt with it) ...
    assert invalidate(tmp_path, "clean", "why") == ["dedup", "nsfw"]
    assert " ".join(capsys.readouterr().err.split()) == "clean: why; rebuilding clean, dedup, nsfw"
    for stage in ("dedup", "nsfw"):
        (tmp_path / stage).mkdir()
    # ... while a command that removes folders for its own reason lists only what it removes
    assert invalidate(tmp_path, "clean", "why", who="surd run --from clean") == ["dedup", "nsfw"]
    assert " ".join(capsys.readouterr().err.split()) == "surd run --from clean: why; rebuilding dedup, nsfw"
    (tmp_path / "nsfw").mkdir()
    assert invalidate(tmp_path, "nsfw", "why", quiet=True) == ["nsfw"] and capsys.readouterr().err == ""


class _Rows(Job):
    """A job of two shards whose run reports the rows it finished."""

    def __init__(self) -> None:
        self.todo = ["a", "b"]
        self.ready = False

    def setup(self) -> None:
        self.ready = True

    def run(self, rel: str, on_rows: Any = None) -> dict[str, Any]:
        assert self.ready
        on_rows(3 if rel == "a" else 4)
        return {"rel": rel}


def test_a_workers_side_of_the_pool_in_process() -> None:
    # what each spawned worker does: set the job up once, run shards, add finished rows to the shared counter
    job, finished = _Rows(), multiprocessing.get_context("spawn").Value("q", 0)
    executor._init_worker(job, finished)
    try:
        assert job.ready
        assert executor._run_in_worker("a") == {"rel": "a"} and executor._run_in_worker("b") == {"rel": "b"}
        assert finished.value == 7
    finally:
        executor._WORKER_JOB = executor._WORKER_ROWS = None
    assert Job().size("anything") == 1 and job.total() == 2  # a plain job counts shards


def test_close_writes_the_manifest_under_the_stage_name(tmp_path: Path) -> None:
    out = tmp_path / "clean"
    commit(out, "s/part-00000", from_rows([{"id": "a"}]), shards.empty_dropped(), 1, 0.1)
    job = StageJob("clean", None, "collect", tmp_path / "collect", out)
    assert job.close({"extra": 1})["kept"] == 1
    manifest = shards.read_manifest(out)
    assert (manifest["stage"], manifest["input_stage"], manifest["extra"]) == ("clean", "collect", 1)


def test_read_table_reads_only_the_columns_asked(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    shards.write_table(path, from_rows([{"id": "a", "sha256": "s"}]))
    assert shards.read_table(path, columns=["id", "sha256"]).column_names == ["id", "sha256"]
    assert isinstance(shards.read_table(path), pa.Table) and shards.read_table(path).num_columns > 2


def test_umask_is_read_without_changing_it() -> None:
    before = os.umask(0o027)
    try:
        assert shards._umask() == 0o027
        assert os.umask(0o027) == 0o027  # still what it was
    finally:
        os.umask(before)


def test_an_input_that_is_no_stage_is_gone_even_if_a_folder_has_its_name(tmp_path: Path) -> None:
    # a record naming a folder that is not a stage (hand-edited, or from another surd) is never read as an input
    (tmp_path / "other").mkdir()
    commit(tmp_path / "other", "s", from_rows([{"id": "a"}]), shards.empty_dropped(), 1, 0.1)
    shards.write_manifest(tmp_path / "other", "other")
    dedup = layout.stage_dir(tmp_path, "dedup")
    dedup.mkdir()
    fingerprint.write(dedup, fingerprint.record("dedup", {}, fingerprint.input_of(tmp_path, "other")))
    assert fingerprint.stale(tmp_path, "dedup") == "its input other/ is gone"


class _Shards(_Rows):
    label = "job"

    def run(self, rel: str, on_rows: Any = None) -> dict[str, Any]:
        assert on_rows is None  # counted by shards: no row reports asked for
        self.done = [*getattr(self, "done", []), rel]
        return {}


def _last_line(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_run_job_shows_rows_or_shards_done(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _finished(tmp_path, "s/part-00000", "s/part-00001")
    job = open_stage(tmp_path, "clean", _EveryConfig())
    capsys.readouterr()
    run_job(job)  # by default: serial, with progress, by rows
    assert _last_line(capsys).startswith("[surd] clean (collect -> clean): 8/8 rows (100%)")
    shards_job = _Shards()
    run_job(shards_job, unit="shards")
    assert shards_job.done == ["a", "b"]
    assert _last_line(capsys).startswith("[surd] job: 2/2 shards (100%)")


def test_run_job_in_a_pool_of_spawned_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _finished(tmp_path, "s/part-00000", "s/part-00001", "s/part-00002")
    job = open_stage(tmp_path, "clean", _EveryConfig())
    capsys.readouterr()
    run_job(job, workers=2, progress=True)
    assert all(shards.is_done(job.out, rel) for rel in job.todo)
    assert job.close()["in"] == 12
    assert _last_line(capsys).startswith("[surd] clean (collect -> clean): 12/12 rows (100%)")  # counted in workers


class _Counting(RowProcessor):
    """Keeps every row; `seen` grows with each row, `fixed` never changes after the first shard."""

    def __init__(self) -> None:
        self.counters = {"seen": 0, "fixed": 1}

    def process_batch(self, rows: list[dict]) -> list[dict]:
        self.counters["seen"] += len(rows)
        return rows


def test_process_shard_counts_only_what_changed_and_takes_an_empty_shard(tmp_path: Path) -> None:
    _finished(tmp_path, "s/part-00000")
    commit(layout.stage_dir(tmp_path, "collect"), "s/part-00001", from_rows([]), shards.empty_dropped(), 0, 0.1)
    shards.write_manifest(layout.stage_dir(tmp_path, "collect"), "collect")
    job = open_stage(tmp_path, "clean", _EveryConfig(), processor=_Counting())
    calls: list[int] = []
    stats = job.run("s/part-00000", on_rows=calls.append)
    assert sum(calls) == 4  # every row reported to the caller
    assert stats["counters"] == {"seen": 4}  # `fixed` did not change in this shard: not counted
    assert 0 <= stats["seconds"] < 600
    empty = job.run("s/part-00001")
    assert (empty["in"], empty["kept"], empty["dropped"]) == (0, 0, {}) and "counters" not in empty
    assert shards.read_table(shards.shard_path(job.out, "s/part-00001")).num_rows == 0


class _Paced(StageConfig):
    concurrency: int = 4  # pacing for fetch
    size: int = 1

    def build(self) -> _Counting:
        return _Counting()


def test_open_stage_records_the_stage_its_settings_and_input(tmp_path: Path) -> None:
    _finished(tmp_path, "s/part-00000")
    job = open_stage(tmp_path, "fetch", _Paced(size=2))
    record = fingerprint.read(job.out)
    assert record["stage"] == "fetch" and record["settings"] == {"size": 2}  # concurrency only paces fetch
    assert record["input"] == fingerprint.input_of(tmp_path, "collect")
    other = open_stage(tmp_path, "clean", _Paced(), settings={"given": True})
    assert fingerprint.read(other.out)["settings"] == {"given": True}
    run_job(job, progress=False)
    job.close()
    done = open_stage(tmp_path, "fetch", _Paced(size=2))
    assert (done.name, done.stage, done.source, done.src, done.out, done.todo, done.up_to_date) == (
        "fetch", None, "collect", layout.stage_dir(tmp_path, "collect"), job.out, [], True)
    with pytest.raises(StageError, match=rf"^clean: its input stage dedup is not finished in {tmp_path}; run it"):
        open_stage(tmp_path, "clean", _Paced(), source="dedup")


class _PlansWithProgress(_Counting):
    plan_columns = ("id",)
    on_rows = None

    def plan(self, index: Any) -> None:
        if self.on_rows is not None:
            self.on_rows(len(index))


def test_open_stage_shows_plan_progress_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _finished(tmp_path, "s/part-00000")
    capsys.readouterr()
    open_stage(tmp_path, "clean", _EveryConfig(), processor=_PlansWithProgress())
    assert capsys.readouterr().err == ""
    open_stage(tmp_path, "clean", _EveryConfig(), processor=_PlansWithProgress(), progress=True)
    assert "[surd] clean: plan over collect: 4/4 rows (100%)" in capsys.readouterr().err


def test_open_stage_after_every_shard_but_before_the_manifest(tmp_path: Path) -> None:
    # killed between the last shard's marker and the manifest: nothing to process, the manifest still to write
    _finished(tmp_path, "s/part-00000")
    job = open_stage(tmp_path, "clean", _EveryConfig())
    run_job(job, progress=False)
    again = open_stage(tmp_path, "clean", _EveryConfig())
    assert (again.name, again.stage, again.source, again.src, again.out, again.todo, again.up_to_date) == (
        "clean", None, "collect", layout.stage_dir(tmp_path, "collect"), job.out, [], False)
    again.close()
    assert shards.read_manifest(job.out)["stage"] == "clean"


def test_a_stage_folder_gone_by_hand_rebuilds_the_stages_after_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _finished(tmp_path, "s/part-00000")
    (layout.stage_dir(tmp_path, "dedup") / "_stats").mkdir(parents=True)
    capsys.readouterr()
    open_stage(tmp_path, "clean", _EveryConfig())
    assert " ".join(capsys.readouterr().err.split()) == \
        "clean: its folder is missing, so the stages after it are stale; rebuilding clean, dedup"
    assert not layout.stage_dir(tmp_path, "dedup").exists()


def test_shards_are_written_in_row_groups_of_1024_with_zstd(tmp_path: Path) -> None:
    # readers stream a shard a row group at a time: the group size bounds their memory
    path = tmp_path / "t.parquet"
    shards.write_table(path, from_rows([{"id": str(i)} for i in range(2049)]))
    meta = pq.read_metadata(path)
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1024, 1024, 1]
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_reading_a_stage_returns_only_the_columns_asked(tmp_path: Path) -> None:
    # `id` is the schema's first column: ask for a later one too, so "all columns" cannot pass for "these"
    stage = tmp_path / "clean"
    commit(stage, "s/part-00000", from_rows([{"id": "a", "sha256": "h"}]),
           from_rows([{"id": "b", "drop_stage": "clean", "drop_reason": "x"}], DROPPED_SCHEMA), 2, 0.1)
    [batch] = shards.read_stage(stage, columns=["sha256", "id"])
    assert batch.schema.names == ["sha256", "id"] and batch.to_pylist() == [{"sha256": "h", "id": "a"}]
    assert shards.read_stage_table(stage, columns=["sha256"]).to_pylist() == [{"sha256": "h"}]
    [dropped] = shards.read_dropped(stage, columns=["drop_reason"])
    assert dropped.to_pylist() == [{"drop_reason": "x"}]


def test_hidden_files_are_no_shards_dropped_rows_or_stats(tmp_path: Path) -> None:
    # e.g. macOS's `._name` files beside each file copied to a foreign file system: not ours, never read
    stage = tmp_path / "clean"
    dropped = from_rows([{"id": "d", "drop_stage": "clean", "drop_reason": "odd"}], DROPPED_SCHEMA)
    commit(stage, "s/part-00000", from_rows([{"id": "a"}]), dropped, 2, 1.0)
    (stage / "dropped" / "s" / "._part-00000.parquet").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (stage / "_stats" / "s" / "._part-00000.json").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    # sorted, the hidden file comes first: it is skipped, not the end of the folder
    assert [r["id"] for b in shards.read_dropped(stage) for r in b.to_pylist()] == ["d"]
    assert shards.stage_stats(stage) == {"in": 2, "kept": 1, "dropped": {"odd": 1}, "seconds": 1.0, "shards": 1}


def test_stats_files_lacking_a_count_add_nothing_for_it(tmp_path: Path) -> None:
    # a stats file of an earlier surd may lack a key: it counts as 0, and the others still add up
    root = tmp_path / "_stats"
    root.mkdir()
    (root / "a.json").write_text('{"kept": 2}')
    (root / "b.json").write_text('{"in": 3, "seconds": 0.5}')
    (root / "c.json").write_text('{"in": 1, "kept": 1, "seconds": 0.25, "dropped": {"odd": 1}}')
    assert shards.stage_stats(tmp_path) == {"in": 4, "kept": 3, "dropped": {"odd": 1}, "seconds": 0.75, "shards": 3}


def test_a_model_stage_pins_torchs_threads_and_a_parent_block_restores_them() -> None:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    try:
        assert executor.pin_threads(other) == before and torch.get_num_threads() == other
        assert executor.pin_threads(None) is None and torch.get_num_threads() == other  # None: left alone
        executor.pin_threads(before)
        with executor.threads_pinned(other):
            assert torch.get_num_threads() == other
        assert torch.get_num_threads() == before
        stage = Stage("nsfw", _Model(), threads=other)
        assert stage.threads == other
        stage.setup()  # what a worker does before its first batch
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(before)


class _Reports(RowProcessor):
    """Reports `first` rows of every batch itself; the stage reports the rest when the batch returns."""

    on_rows = None

    def __init__(self, first: int) -> None:
        self.first = first
        self.lent: list[bool] = []

    def process_batch(self, rows: list[dict]) -> list[dict]:
        self.lent.append(self.on_rows is not None)
        for _ in range(self.first):
            self.on_rows(1)
        return rows


def test_a_batch_reports_its_rows_once_as_they_finish() -> None:
    calls: list[int] = []
    processor = _Reports(first=2)
    Stage("fetch", processor)(from_rows([{"id": str(i)} for i in range(5)]), calls.append)
    assert calls == [1, 1, 3] and processor.lent == [True] and processor.on_rows is None
    calls.clear()
    every = _Reports(first=3)
    Stage("fetch", every)(from_rows([{"id": str(i)} for i in range(3)]), calls.append)
    assert calls == [1, 1, 1]  # all reported already: no trailing report of 0
    Stage("fetch", _Reports(first=0))(from_rows([{"id": "a"}]))  # nobody listens: nothing lent, nothing fails


def _watched() -> None:
    executor._exit_with_parent()  # what every pool worker does first
    time.sleep(60)


def _orphaning(pipe: Any) -> None:
    worker = multiprocessing.get_context("spawn").Process(target=_watched)
    worker.start()
    pipe.send(worker.pid)
    os._exit(0)  # gone without a word to its child, as after a kill -9


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _finishing(pipe: Any) -> None:
    executor._exit_with_parent()
    pipe.send([(t.name, t.daemon) for t in threading.enumerate() if t is not threading.main_thread()])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_worker_exits_when_its_parent_is_gone() -> None:
    executor._exit_with_parent()  # in a process without a multiprocessing parent: nothing to watch
    context = multiprocessing.get_context("spawn")
    # a worker whose parent lives on: the watch is a daemon thread that says what it is, and never holds up the
    # worker's own exit (a pool joins its workers when it shuts down)
    receive, send = context.Pipe(duplex=False)
    worker = context.Process(target=_finishing, args=(send,))
    worker.start()
    try:
        assert ("surd-parent-watch", True) in (receive.recv() if receive.poll(120) else [])
        worker.join(120)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():  # a worker that would outlive the test
            worker.kill()
            worker.join()
    # a worker whose parent is gone without a word: it exits by itself
    receive, send = context.Pipe(duplex=False)
    parent = context.Process(target=_orphaning, args=(send,))
    parent.start()
    pid = receive.recv()
    parent.join()
    try:
        deadline = time.monotonic() + 120  # generous: under load (mutation testing) a spawn can take many seconds
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the worker outlived its parent"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_discard_sets_aside_inside_the_run_folder_wherever_the_temp_folder_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # renaming is atomic only within one file system: the system temp folder may be on another (a tmpfs)
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a temp folder on another file system than the run folder")
    other = Path(tempfile.mkdtemp(dir=shm))
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(other))
        (tmp_path / "clean" / "s").mkdir(parents=True)
        (tmp_path / "clean" / "s" / "x.parquet").write_bytes(b"x")
        discard(tmp_path, tmp_path / "clean")
        assert list(tmp_path.iterdir()) == [] and list(other.iterdir()) == []
    finally:
        shutil.rmtree(other, ignore_errors=True)


class _Sized(_Rows):
    """Shards of 3 and 4 rows, each reported by its run."""

    label = "sized"

    def size(self, rel: str) -> int:
        return 3 if rel == "a" else 4


def test_run_job_lends_row_reports_by_default_and_can_be_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    job = _Sized()
    run_job(job, progress=False)  # by rows: each run hears of its rows (an on_rows to call)
    assert capsys.readouterr().err == ""  # no progress asked: no line
    run_job(_Sized())
    assert _last_line(capsys).startswith("[surd] sized: 7/7 rows (100%)")


class _Threads(Job):
    """A job computing with 1 torch thread where the process had another count."""

    todo = ["a"]

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.seen: list[int] = []

    def run(self, rel: str, on_rows: Any = None) -> dict[str, Any]:
        import torch

        self.seen.append(torch.get_num_threads())
        return {}


def test_a_serial_run_pins_the_jobs_threads_and_restores_them() -> None:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    job = _Threads(1 if before != 1 else 2)
    try:
        run_job(job, progress=False)
        assert job.seen == [job.threads] and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


_MARK: list[str] = []  # set in the test process only: a forked worker inherits it, a spawned one starts without


class _Where(Job):
    """Each shard notes the process that ran it and its `_MARK`; it waits (2 min at most) until `meet` shards run."""

    label = "where"

    def __init__(self, out: Path, todo: list[str], meet: int = 1) -> None:
        self.out, self.todo, self.meet = out, todo, meet
        self.parent = os.getpid()

    def size(self, rel: str) -> int:
        return {"a": 2, "b": 3, "c": 4}[rel]

    def run(self, rel: str, on_rows: Any = None) -> dict[str, Any]:
        (self.out / f"{rel}.{os.getpid()}").write_text(json.dumps(_MARK))
        if os.getpid() == self.parent:
            return {}  # run serially: no other shard can be running
        deadline = time.monotonic() + 120
        while len(list(self.out.iterdir())) < self.meet and time.monotonic() < deadline:
            time.sleep(0.02)
        return {}


def _ran(out: Path) -> dict[str, tuple[int, list[str]]]:
    return {p.name.split(".")[0]: (int(p.name.split(".")[1]), json.loads(p.read_text())) for p in out.iterdir()}


def test_run_job_spawns_as_many_workers_as_asked_only_for_two_shards_or_more(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _MARK.append("parent")
    try:
        for name, todo, workers in (("one", ["a"], 2), ("two", ["a", "b"], 2), ("three", ["a", "b", "c"], 3)):
            (tmp_path / name).mkdir()
            run_job(_Where(tmp_path / name, todo, meet=len(todo)), workers=workers, unit="images")
            if name == "two":  # counted in the parent as each shard's future finishes, by the shard's size
                assert _last_line(capsys).startswith("[surd] where: 5/5 images (100%)")
        one, two, three = (_ran(tmp_path / n) for n in ("one", "two", "three"))
    finally:
        _MARK.clear()
    assert one == {"a": (os.getpid(), ["parent"])}  # one shard: no pool, this process
    # two shards, two workers: both at once, each in a fresh spawned process (nothing inherited from this one)
    assert len({pid for pid, _ in two.values()}) == 2 and os.getpid() not in {pid for pid, _ in two.values()}
    assert [mark for _, mark in two.values()] == [[], []]
    assert len({pid for pid, _ in three.values()}) == 3  # three workers, whatever the number of cores


class _Held(Job):
    """Two shards of 2 rows, each reported at once; neither finishes before `out/go` exists (2 minutes at most)."""

    label = "held"

    def __init__(self, out: Path) -> None:
        self.out, self.todo = out, ["a", "b"]

    def size(self, rel: str) -> int:
        return 2

    def run(self, rel: str, on_rows: Any = None) -> dict[str, Any]:
        on_rows(2)
        (self.out / f"started-{rel}").touch()
        deadline = time.monotonic() + 120
        while not (self.out / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return {}


def test_a_pool_shows_rows_while_its_shards_still_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURD_PROGRESS_EVERY", "0.05")  # a progress line every 0.05 s (stderr is no terminal here)
    runner = threading.Thread(target=run_job, args=(_Held(tmp_path),), kwargs={"workers": 2})
    runner.start()
    seen, deadline = "", time.monotonic() + 120  # generous: under load a spawn can take many seconds
    try:
        while "held: 4/4 rows" not in seen and time.monotonic() < deadline:
            if len(list(tmp_path.glob("started-*"))) == 2:  # both shards running: the bar has 10 s to hear of them
                deadline = min(deadline, time.monotonic() + 10)
            time.sleep(0.05)
            seen += capsys.readouterr().err
    finally:
        (tmp_path / "go").touch()
        runner.join()
    assert "held: 4/4 rows" in seen  # seen before any shard finished: the workers' rows, not finished shards


class _Plans(_Model):
    """A model stage that plans over `sha256` and `id`, noting what its plan was given and with how many threads."""

    plan_columns = ("sha256", "id")

    def plan(self, index: Any) -> None:
        import torch

        self.threads_seen = torch.get_num_threads()
        self.table = isinstance(index, pa.Table)
        batches = [index] if self.table else list(index)
        self.names = [b.schema.names for b in batches]
        self.ids = [i for b in batches for i in b.column("id").to_pylist()]

    def process_batch(self, rows: list[dict]) -> list[dict | Drop]:
        return [Drop("odd", r["id"]) if r["id"].endswith(("1", "3")) else r for r in rows]


class _StreamPlans(_Plans):
    plan_streaming = True


def test_open_stage_builds_the_named_stage_and_plans_over_its_columns_with_its_threads(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    _finished(tmp_path, "s/part-00000", "s/part-00001")
    before = torch.get_num_threads()
    threads = 2 if before != 2 else 3
    ids = [f"s/part-0000{s}-{k}" for s in range(2) for k in range(4)]
    try:
        for processor in (_Plans(), _StreamPlans()):
            job = open_stage(tmp_path, "clean", _EveryConfig(num_cpus=threads), processor=processor)
            # a model stage computes with its num_cpus threads, its plan too, and the count is restored after
            assert job.threads == job.stage.threads == threads and processor.threads_seen == threads
            assert torch.get_num_threads() == before
            assert processor.ids == ids and processor.names and all(n == ["sha256", "id"] for n in processor.names)
            assert processor.table is not isinstance(processor, _StreamPlans)  # streamed: batches, not one table
        run_job(job, progress=False)
    finally:
        torch.set_num_threads(before)
    kept = shards.read_stage_table(job.out, columns=["id"])
    records = [r for b in shards.read_dropped(job.out, columns=["id", "drop_stage"]) for r in b.to_pylist()]
    assert len(records) == 4 and {r["drop_stage"] for r in records} == {"clean"}  # drops name the stage
    assert kept.num_rows == 4


class _Shaped(StageConfig):
    sizes: tuple[int, ...] = (256, 512)
    mode: Literal["fast", "exact"] = "exact"
    kinds: frozenset[str] = frozenset({"png"})
    since: datetime.date = datetime.date(2026, 1, 2)


def test_settings_are_recorded_as_json_so_a_record_read_back_matches(tmp_path: Path) -> None:
    # dumped as Python, a set or a date would not even write as JSON, and what is read back must equal what is asked
    # (or the stage is rebuilt on every run)
    settings = fingerprint.settings_of("clean", _Shaped(), tmp_path)
    assert settings == {"sizes": [256, 512], "mode": "exact", "kinds": ["png"], "since": "2026-01-02"}
    record = fingerprint.record("clean", settings, {"stage": "collect"})
    fingerprint.write(tmp_path, record)
    assert fingerprint.difference(fingerprint.read(tmp_path), record) is None


def test_a_stage_streams_in_batches_of_at_most_1024_rows(tmp_path: Path) -> None:
    # the default batch is what bounds a streamed stage's memory: 2,049 rows come as 1,024 + 1,024 + 1
    stage = tmp_path / "clean"
    commit(stage, "s/part-00000", from_rows([{"id": str(i)} for i in range(2049)]), shards.empty_dropped(), 2049, 0.1)
    assert [len(b) for b in shards.read_stage(stage, columns=["id"])] == [1024, 1024, 1]
    # and the default is observable: another batch size does not split the same shard so
    assert [len(b) for b in shards.read_stage(stage, columns=["id"], batch_size=1025)] != [1024, 1024, 1]
