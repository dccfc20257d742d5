"""Shard I/O and the executor core, in process: layout, atomic writes, stats sums, manifests, drops, resumption.

Each assertion states the documented contract (surd/shards.py, pipelines/executor.py module docs); the kill tests
(test_resume.py, test_resume_windows.py) check the same rules end to end in subprocesses.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.executor import (
    Stage,
    commit,
    drop_records,
    input_stage,
    open_stage,
    remove_stale_temp_files,
    run_job,
)
from surd import layout, shards
from surd.errors import ShardError, StageError
from surd.rows import Drop, StageConfig
from surd.schema import DROPPED_SCHEMA, SCHEMA, SCHEMA_VERSION, from_rows


def _rows(*ids: str) -> pa.Table:
    return from_rows([{"id": i, "keyword_prompt": f"prompt {i}"} for i in ids])


def _dropped(*pairs: tuple[str, str]) -> pa.Table:
    return from_rows([{"id": i, "drop_stage": "clean", "drop_reason": r} for i, r in pairs], DROPPED_SCHEMA)


# ---- atomic writes ----


def test_atomic_writes_publish_whole_files_with_the_usual_mode(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "file.json"
    shards.atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'  # sorted, indented, newline
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    shards.atomic_write_bytes(path, b"replaced")
    assert path.read_bytes() == b"replaced"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.json"]  # no temp file left


def test_a_failed_write_leaves_nothing_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"

    class Boom(Exception):
        pass

    class BadTable:
        """Writing it raises half-way (pq.write_table calls .schema first)."""

        @property
        def schema(self) -> Any:
            raise Boom

    with pytest.raises(Boom):
        shards.write_table(path, BadTable())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    full = OSError(28, "No space left on device")
    with pytest.raises(OSError) as e, shards._atomic(path):
        raise full
    assert e.value.filename == str(path) and list(tmp_path.iterdir()) == []


def test_write_table_is_zstd_with_the_asked_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    shards.write_table(path, _rows(*[str(i) for i in range(5)]), row_group_size=2)
    meta = pq.read_metadata(path)
    assert (meta.num_rows, meta.num_row_groups) == (5, 3)
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert shards.read_table(path, columns=["id"]).column("id").to_pylist() == ["0", "1", "2", "3", "4"]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(ShardError, match=f"cannot read shard {bad}"):
        shards.read_table(bad)


# ---- a stage folder's layout ----


def test_paths_of_one_shard(tmp_path: Path) -> None:
    rel = "folder/part-00002"
    assert shards.shard_path(tmp_path, rel) == tmp_path / "folder" / "part-00002.parquet"
    assert shards.dropped_path(tmp_path, rel) == tmp_path / "dropped" / "folder" / "part-00002.parquet"
    assert shards.stats_path(tmp_path, rel) == tmp_path / "_stats" / "folder" / "part-00002.json"
    assert shards.marker_path(tmp_path, rel) == tmp_path / "_done" / "folder" / "part-00002"
    assert shards.side_path(tmp_path, "emb", rel) == tmp_path / "_side" / "emb" / "folder" / "part-00002.parquet"


def test_shard_names_skip_every_side_folder_and_temp_files(tmp_path: Path) -> None:
    for name in ("b/part-00001", "a/part-00000", "b/part-00000", "dropped/a/part-00000", "_stats/x", "_done/x",
                 "_raw/x", "_side/emb/a/part-00000", "a/.part-00003.parquet.abc", "nested/deeper/part-00000"):
        path = tmp_path / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    assert shards.shard_names(tmp_path) == ["a/part-00000", "b/part-00000", "b/part-00001", "nested/deeper/part-00000"]


def test_shard_stats_counts_reasons_and_rounds_seconds() -> None:
    dropped = _dropped(("x", "too_small"), ("y", "empty"), ("z", "too_small"))
    assert shards.shard_stats(10, 7, dropped, 1.234567) == {
        "in": 10, "kept": 7, "dropped": {"too_small": 2, "empty": 1}, "seconds": 1.2346}
    assert shards.shard_stats(1, 1, shards.empty_dropped(), 0.0, {"hits": 2})["counters"] == {"hits": 2}
    assert "counters" not in shards.shard_stats(1, 1, shards.empty_dropped(), 0.0, {})


def test_commit_writes_everything_then_the_marker(tmp_path: Path) -> None:
    rel = "src/part-00000"
    plain = from_rows([{"id": "a", "width": 7}])
    kept = plain.set_column(plain.schema.get_field_index("width"), "width", pa.array([7], pa.int64()))
    assert kept.schema != SCHEMA  # int64 width: cast to the SURD schema on the way
    stats = commit(tmp_path, rel, kept, _dropped(("b", "empty")), 2, 0.5, {"c": 1})
    assert stats == {"in": 2, "kept": 1, "dropped": {"empty": 1}, "seconds": 0.5, "counters": {"c": 1}}
    written = pq.read_schema(shards.shard_path(tmp_path, rel))
    assert written.equals(SCHEMA) and written.field("width").type == pa.int32()
    assert pq.read_table(shards.dropped_path(tmp_path, rel)).column("id").to_pylist() == ["b"]
    assert json.loads(shards.stats_path(tmp_path, rel).read_text()) == stats
    assert shards.is_done(tmp_path, rel) and shards.marker_path(tmp_path, rel).read_bytes() == b""
    assert not shards.is_done(tmp_path, "src/part-00001")
    # Order: every file's mtime is at most the marker's.
    marker_time = shards.marker_path(tmp_path, rel).stat().st_mtime_ns
    for path in (shards.shard_path(tmp_path, rel), shards.dropped_path(tmp_path, rel),
                 shards.stats_path(tmp_path, rel)):
        assert path.stat().st_mtime_ns <= marker_time


def _stage_folder(root: Path) -> Path:
    commit(root, "s/part-00001", _rows("c"), _dropped(("d", "empty")), 2, 1.0, {"n": 1})
    commit(root, "s/part-00000", _rows("a", "b"), _dropped(("e", "empty"), ("f", "small")), 4, 2.5, {"n": 2, "m": 1})
    return root


def test_reading_a_stage_in_name_order(tmp_path: Path) -> None:
    stage = _stage_folder(tmp_path / "clean")
    batches = list(shards.read_stage(stage, columns=["id"], batch_size=1))
    assert [b.column(0).to_pylist() for b in batches] == [["a"], ["b"], ["c"]]
    assert shards.read_stage_table(stage, columns=["id"]).column("id").to_pylist() == ["a", "b", "c"]
    dropped = [r["id"] for b in shards.read_dropped(stage, columns=["id"]) for r in b.to_pylist()]
    assert dropped == ["e", "f", "d"]
    (stage / "dropped" / "s" / ".part-00009.parquet.x.tmp").write_bytes(b"junk")  # a killed writer's temp file
    assert len([r for b in shards.read_dropped(stage) for r in b.to_pylist()]) == 3
    assert list(shards.read_dropped(tmp_path / "nowhere")) == []


def test_reading_missing_empty_and_corrupt_stages(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="stage folder not found"):
        list(shards.read_stage(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert shards.read_stage_table(tmp_path / "empty").schema == SCHEMA
    only = shards.read_stage_table(tmp_path / "empty", columns=["id", "phash"])
    assert only.num_rows == 0 and only.schema == pa.schema([SCHEMA.field("id"), SCHEMA.field("phash")])
    stage = _stage_folder(tmp_path / "clean")
    shards.shard_path(stage, "s/part-00001").write_bytes(b"not parquet")
    with pytest.raises(ShardError, match="part-00001"):
        list(shards.read_stage(stage))


def test_stage_stats_sum_every_shard(tmp_path: Path) -> None:
    stage = _stage_folder(tmp_path / "clean")
    (stage / "_stats" / "s" / ".part-00009.json.x.tmp").write_text('{"in": 100}')
    assert shards.stage_stats(stage) == {"in": 6, "kept": 3, "dropped": {"empty": 2, "small": 1}, "seconds": 3.5,
                                         "shards": 2, "counters": {"n": 3, "m": 1}}
    assert shards.stage_stats(tmp_path / "nowhere") == {"in": 0, "kept": 0, "dropped": {}, "seconds": 0.0,
                                                        "shards": 0}


def test_manifest_round_trip_and_version_check(tmp_path: Path) -> None:
    stage = _stage_folder(tmp_path / "clean")
    assert shards.read_manifest(stage) is None
    manifest = shards.write_manifest(stage, "clean", extra={"input_stage": "collect"})
    assert manifest == {
        "stage": "clean", "schema_version": SCHEMA_VERSION, "rows": 3, "input_stage": "collect",
        "shards": [{"name": "s/part-00000", "rows": 2}, {"name": "s/part-00001", "rows": 1}],
        "stats": shards.stage_stats(stage),
    }
    assert shards.read_manifest(stage) == manifest
    (stage / shards.MANIFEST).write_text(json.dumps({**manifest, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ShardError, match=f"schema version {SCHEMA_VERSION + 1} but this surd writes"):
        shards.read_manifest(stage)


# ---- the executor core ----


def test_drop_records_keep_rows_and_record_drops_with_their_source_row() -> None:
    inputs = [{"id": "a"}, {"id": "b", "x": 1}, {"id": "c"}, {"id": "d"}]
    items = [{"id": "a", "k": 1}, Drop("empty", "", row=None), Drop("small", "3x3", row={"id": "c2"}),
             Drop("junk", None)]
    kept, dropped = drop_records(items, "clean", inputs=inputs, defaults={"source": "folder", "x": 9})
    assert kept == [{"id": "a", "k": 1}]
    assert dropped == [
        {"id": "b", "x": 1, "source": "folder", "drop_stage": "clean", "drop_reason": "empty", "drop_detail": None},
        {"id": "c2", "source": "folder", "x": 9, "drop_stage": "clean", "drop_reason": "small",
         "drop_detail": "3x3"},
        {"id": "d", "source": "folder", "x": 9, "drop_stage": "clean", "drop_reason": "junk", "drop_detail": None},
    ]
    assert inputs[1] == {"id": "b", "x": 1}  # the input row itself is not changed
    _, bare = drop_records([Drop("empty", "d")], "collect")
    assert bare == [{"drop_stage": "collect", "drop_reason": "empty", "drop_detail": "d"}]


class _Every:
    """A processor keeping ids that end in an even digit; counts, plans and side tables like real stages do."""

    plan_columns = ("id",)

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.setups = 0
        self.planned: list[str] | None = None
        self.side: list[dict] = []

    def setup(self) -> None:
        self.setups += 1

    def plan(self, index: pa.Table) -> None:
        self.planned = index.column("id").to_pylist()

    def process_batch(self, rows: list[dict]) -> list[dict | Drop]:
        self.counters["seen"] = self.counters.get("seen", 0) + len(rows)
        self.side += [{"id": r["id"]} for r in rows]
        return [r if int(r["id"][-1]) % 2 == 0 else Drop("odd", r["id"]) for r in rows]

    def take_side_tables(self) -> dict[str, pa.Table]:
        rows, self.side = self.side, []
        return {"ids": pa.Table.from_pylist(rows)} if rows else {}


def test_stage_call_setup_counters_and_a_wrong_result_count() -> None:
    processor = _Every()
    stage = Stage("clean", processor, batch_size=3)
    assert stage.plan_columns == ("id",) and stage.batch_size == 3
    kept, dropped = stage(_rows("1", "2", "4"))
    stage(_rows("6"))
    assert processor.setups == 1  # set up once, however many batches
    assert kept.column("id").to_pylist() == ["2", "4"] and kept.schema == SCHEMA
    [drop] = dropped.to_pylist()
    assert (drop["id"], drop["drop_stage"], drop["drop_reason"], drop["drop_detail"]) == ("1", "clean", "odd", "1")
    assert stage.counters() == {"seen": 4}
    assert stage.take_side_tables()["ids"].num_rows == 4 and stage.take_side_tables() == {}
    processor.process_batch = lambda rows: rows[:-1]  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="processor returned 1 results for 2 rows"):
        stage(_rows("2", "4"))
    bare = Stage("x", type("P", (), {"process_batch": lambda self, rows: rows})())
    assert bare.plan_columns == () and bare.counters() == {} and bare.take_side_tables() == {}
    bare.setup()


def test_remove_stale_temp_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/.x.parquet.1.tmp", "a/b/.y.json.2.tmp", "a/keep.parquet", "a/visible.tmp", "a/.hidden"):
        (tmp_path / name).write_bytes(b"")
    remove_stale_temp_files(tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["a/.hidden", "a/keep.parquet", "a/visible.tmp"]
    remove_stale_temp_files(tmp_path / "missing")  # nothing to do


def _finished(run: Path, stage: str, *rels: str) -> None:
    for i, rel in enumerate(rels):
        commit(layout.stage_dir(run, stage), rel, _rows(*(f"{rel}-{k}" for k in range(i, i + 4))),
               shards.empty_dropped(), 4, 0.1)
    shards.write_manifest(layout.stage_dir(run, stage), stage)


def test_input_stage_is_the_latest_finished_earlier_stage(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=f"clean: no finished earlier stage in {tmp_path}"):
        input_stage(tmp_path, "clean")
    _finished(tmp_path, "collect", "s/part-00000")
    assert input_stage(tmp_path, "clean") == "collect" and input_stage(tmp_path, "export") == "collect"
    _finished(tmp_path, "clean", "s/part-00000")
    (layout.stage_dir(tmp_path, "dedup") / "_stats").mkdir(parents=True)  # started, not finished
    assert input_stage(tmp_path, "export") == "clean"
    assert input_stage(tmp_path, "clean") == "collect"  # never itself or a later stage


class _Config(StageConfig):
    def build(self) -> _Every:
        return _Every()


def test_open_stage_plans_resumes_and_rebuilds_on_a_changed_input(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _finished(tmp_path, "collect", "s/part-00000", "s/part-00001", "s/part-00002")
    config = _Config(batch_size=3)
    job = open_stage(tmp_path, "clean", config)
    assert (job.name, job.source, job.todo) == ("clean", "collect", ["s/part-00000", "s/part-00001",
                                                                     "s/part-00002"])
    assert job.stage.batch_size == 3 and job.size("s/part-00001") == 4 and job.total() == 12
    assert len(job.stage.processor.planned) == 12  # the plan saw every input row, before any batch
    stats = job.run("s/part-00001")
    assert stats["in"] == 4 and stats["kept"] == 2 and stats["dropped"] == {"odd": 2}
    assert stats["counters"] == {"seen": 4}
    assert pq.read_table(shards.side_path(job.out, "ids", "s/part-00001")).num_rows == 4
    # A killed run's leftovers: a temp file goes, a done shard is not redone.
    (job.out / "s" / ".part-00002.parquet.zz.tmp").write_bytes(b"")
    again = open_stage(tmp_path, "clean", config)
    assert again.todo == ["s/part-00000", "s/part-00002"]
    assert not (job.out / shards.MANIFEST).exists() and not list(job.out.rglob(".*.tmp"))
    run_job(again, workers=1, progress=False)
    totals = again.close()
    assert (totals["in"], totals["kept"], totals["shards"]) == (12, 6, 3)
    assert totals["counters"] == {"seen": 12}  # each shard counted its own rows once
    assert shards.read_manifest(job.out)["input_stage"] == "collect"
    assert open_stage(tmp_path, "clean", config).todo == []
    # A new input shard: the folder was built from another input, so it is rebuilt (saying why), whole.
    (layout.stage_dir(tmp_path, "dedup") / "_stats").mkdir(parents=True)  # a later stage goes with it
    _finished(tmp_path, "collect", "s/part-00000", "s/part-00001", "s/part-00002", "s/part-00003")
    rebuilt = open_stage(tmp_path, "clean", config)
    assert "clean: input collect has other shards (3 -> 4); rebuilding clean, dedup" in " ".join(
        capsys.readouterr().err.split())
    assert len(rebuilt.todo) == 4 and not shards.stage_stats(rebuilt.out)["shards"]
    assert not layout.stage_dir(tmp_path, "dedup").exists()
    assert json.loads((rebuilt.out / layout.FINGERPRINT).read_text())["input"]["shards"] == [
        f"s/part-0000{i}" for i in range(4)]


def test_run_job_serially_with_any_unit(tmp_path: Path) -> None:
    _finished(tmp_path, "collect", "s/part-00000", "s/part-00001")
    job = open_stage(tmp_path, "clean", _Config())
    run_job(job, workers=1, progress=False, unit="shards")
    assert all(shards.is_done(job.out, rel) for rel in ("s/part-00000", "s/part-00001"))
    done = open_stage(tmp_path, "clean", _Config())
    run_job(done, workers=4, progress=False)  # nothing to do: no pool is started
    assert done.todo == []
