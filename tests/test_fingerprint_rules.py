"""Stage fingerprints in process (pipelines/fingerprint.py): what is recorded, how a difference is told in words,
where a folder stands, and when a stage is stale. test_trust_fingerprints.py checks the same end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipelines import fingerprint
from pipelines.executor import commit
from surd import layout, shards
from surd.dedup import DedupConfig
from surd.rows import StageConfig
from surd.schema import from_rows


def _finish(run: Path, stage: str, rows: dict[str, int], record: dict | None = None) -> Path:
    folder = layout.stage_dir(run, stage)
    for rel, n in rows.items():
        table = from_rows([{"id": f"{rel}-{k}"} for k in range(n)])
        commit(folder, rel, table, shards.empty_dropped(), n, 0.1)
    if record is not None:
        fingerprint.write(folder, record)
    shards.write_manifest(folder, stage)
    return folder


def test_pacing_settings_per_stage() -> None:
    assert fingerprint.pacing("clean") == {"batch_size", "num_cpus", "num_gpus"}
    assert {"batch_size", "concurrency", "max_retries", "timeout"} <= fingerprint.pacing("fetch")
    # the LLM batches and threads shape its words: not pacing for pair
    assert "batch_size" not in fingerprint.pacing("pair") and "num_cpus" not in fingerprint.pacing("pair")
    assert {"num_gpus", "prefix_cache", "cache_path"} <= fingerprint.pacing("pair")
    assert fingerprint.pacing("export") == {"batch_size", "num_cpus", "num_gpus", "format"}


class _Paths(StageConfig):
    cache: str = ""
    other: str = ""
    folder: Path | None = None
    concurrency: int = 1


def test_settings_leave_out_pacing_and_spell_the_run_folder(tmp_path: Path) -> None:
    config = DedupConfig(phash_threshold=3, batch_size=7)
    assert fingerprint.settings_of("dedup", config, tmp_path) == {"phash_threshold": 3}
    assert fingerprint.settings_of("dedup", config, tmp_path, exclude=frozenset({"num_gpus"})) == {
        "phash_threshold": 3, "batch_size": 7, "num_cpus": 1.0}
    paths = _Paths(cache=str(tmp_path / "cache" / "x.db"), other="/elsewhere/y", folder=tmp_path / "f")
    # as JSON: a Path is recorded as its string (then spelled from ${out}); fetch's own pacing is left out
    assert fingerprint.settings_of("fetch", paths, tmp_path) == {
        "cache": "${out}/cache/x.db", "other": "/elsewhere/y", "folder": "${out}/f"}
    assert fingerprint.settings_of("clean", paths, tmp_path)["concurrency"] == 1


def test_read_and_write_a_record(tmp_path: Path) -> None:
    assert fingerprint.read(tmp_path) is None  # none written
    (tmp_path / layout.FINGERPRINT).write_text("{not json")
    assert fingerprint.read(tmp_path) is None  # unreadable
    record = fingerprint.record("dedup", {"phash_threshold": 3}, {"stage": "clean"})
    assert record == {"stage": "dedup", "settings": {"phash_threshold": 3}, "input": {"stage": "clean"}}
    fingerprint.write(tmp_path, record)
    assert fingerprint.read(tmp_path) == record


def test_digest_is_the_hash_of_the_record_and_the_finished_shards(tmp_path: Path) -> None:
    record = {"stage": "clean", "settings": {}, "input": {}}
    folder = layout.stage_dir(tmp_path, "clean")
    commit(folder, "s/part-00000", from_rows([{"id": "a"}]), shards.empty_dropped(), 1, 0.1)
    assert fingerprint.digest(folder) is None  # no record, no manifest
    fingerprint.write(folder, record)
    assert fingerprint.digest(folder) is None  # unfinished
    folder = _finish(tmp_path, "clean", {"s/part-00000": 1, "s/part-00001": 2}, record)
    # compact, key-sorted JSON of the record and [name, rows] of every shard (stored in later stages' records:
    # a change to this spelling would make every existing run folder rebuild)
    text = '{"record":{"input":{},"settings":{},"stage":"clean"},"shards":[["s/part-00000",1],["s/part-00001",2]]}'
    assert fingerprint.digest(folder) == hashlib.sha256(text.encode()).hexdigest()
    assert fingerprint.input_of(tmp_path, "clean") == {
        "stage": "clean", "shards": ["s/part-00000", "s/part-00001"], "fingerprint": fingerprint.digest(folder)}
    (folder / shards.MANIFEST).write_text("{broken")
    assert fingerprint.digest(folder) is None


def test_differences_in_words() -> None:
    inp = {"stage": "clean", "shards": ["a"], "fingerprint": "f"}
    current = fingerprint.record("dedup", {"phash_threshold": 6, "x": "y" * 41}, inp)
    assert fingerprint.difference(dict(current), current) is None
    for previous in (None, {"stage": "dedup", "input": inp}):
        assert fingerprint.difference(previous, current) == \
            "built without a fingerprint (an earlier surd, or an interrupted start)"
    before = fingerprint.record("dedup", {"phash_threshold": 4, "x": "y" * 40, "gone": [1]}, inp)
    assert fingerprint.difference(before, current) == \
        f"gone [1] -> null, phash_threshold 4 -> 6, x {'y' * 40} -> {'y' * 37}..."
    settings = current["settings"]
    assert fingerprint.difference(fingerprint.record("dedup", settings, {**inp, "stage": "fetch"}), current) == \
        "input fetch -> clean"
    assert fingerprint.difference(fingerprint.record("dedup", settings, {**inp, "shards": []}), current) == \
        "input clean has other shards (0 -> 1)"
    assert fingerprint.difference(fingerprint.record("dedup", settings, {**inp, "fingerprint": "g"}), current) == \
        "input clean was rebuilt or changed"
    assert fingerprint.difference(fingerprint.record("nsfw", settings, inp), current) == "fingerprint differs"
    assert fingerprint.difference(fingerprint.record("dedup", settings, {"stage": "clean"}),
                                  fingerprint.record("dedup", settings, {"stage": "clean", "shards": None})) == \
        "input clean was rebuilt or changed"


def test_where_a_folder_stands(tmp_path: Path) -> None:
    record = fingerprint.record("clean", {}, {"stage": "collect", "shards": ["a", "b", "c"]})
    folder = tmp_path / "clean"
    assert fingerprint.state(folder, record) == fingerprint.State("new")
    folder.mkdir()
    assert fingerprint.state(folder, record).action == "new"  # empty
    (folder / "junk").write_text("")
    assert fingerprint.state(folder, record) == fingerprint.State(
        "rebuild", "built without a fingerprint (an earlier surd, or an interrupted start)")
    fingerprint.write(folder, record)
    assert fingerprint.state(folder, record, 3) == fingerprint.State("continue", "0 of 3 shards done", 0)
    for rel in ("a", "s/b"):
        commit(folder, rel, from_rows([{"id": rel}]), shards.empty_dropped(), 1, 0.1)
    (folder / "_done" / "sub").mkdir()  # a folder is not a shard
    assert fingerprint.state(folder, record, 3) == fingerprint.State("continue", "2 of 3 shards done", 2)
    assert fingerprint.state(folder, record) == fingerprint.State("continue", "2 shards done", 2)
    (folder / shards.MANIFEST).write_text("{}")
    assert fingerprint.state(folder, record, 3) == fingerprint.State("done")
    other = fingerprint.record("clean", {"min_chars": 3}, record["input"])
    assert fingerprint.state(folder, other) == fingerprint.State("rebuild", "min_chars null -> 3")


def _chain(run: Path) -> None:
    """collect -> clean -> dedup, each recorded as built from the one before."""
    _finish(run, "collect", {"s/part-00000": 2}, {"stage": "collect", "sources": {}})
    for stage, source in (("clean", "collect"), ("dedup", "clean")):
        _finish(run, stage, {"s/part-00000": 2}, fingerprint.record(stage, {}, fingerprint.input_of(run, source)))


def test_stale_names_what_changed_upstream(tmp_path: Path) -> None:
    _chain(tmp_path)
    assert [fingerprint.stale(tmp_path, s) for s in ("collect", "clean", "dedup")] == [None, None, None]
    # collect changes: clean is stale because of it, dedup because clean is
    _finish(tmp_path, "collect", {"s/part-00000": 2, "s/part-00001": 1})
    assert fingerprint.stale(tmp_path, "collect") is None
    assert fingerprint.stale(tmp_path, "clean") == "its input collect/ changed since it was built"
    assert fingerprint.stale(tmp_path, "dedup") == "its input clean/ is stale"
    (layout.stage_dir(tmp_path, "clean") / shards.MANIFEST).unlink()
    assert fingerprint.stale(tmp_path, "dedup") == "its input clean/ is unfinished or being rebuilt"
    layout.stage_dir(tmp_path, "clean").rename(tmp_path / "aside")
    assert fingerprint.stale(tmp_path, "dedup") == "its input clean/ is gone"


@pytest.mark.parametrize("record", [None, {"stage": "dedup", "settings": {}}])
def test_stale_without_an_input_record(tmp_path: Path, record: dict | None) -> None:
    _chain(tmp_path)
    folder = layout.stage_dir(tmp_path, "dedup")
    (folder / layout.FINGERPRINT).unlink()
    if record is not None:
        fingerprint.write(folder, record)
    assert fingerprint.stale(tmp_path, "dedup") == "no fingerprint: built by an earlier surd, rebuilt on the next run"


def test_stale_when_the_shard_list_differs_or_the_input_is_not_a_stage(tmp_path: Path) -> None:
    _chain(tmp_path)
    folder = layout.stage_dir(tmp_path, "dedup")
    record = fingerprint.read(folder)
    fingerprint.write(folder, {**record, "input": {**record["input"], "shards": ["other"]}})
    assert fingerprint.stale(tmp_path, "dedup") == "its input clean/ changed since it was built"
    fingerprint.write(folder, {**record, "input": {**record["input"], "stage": "../clean"}})
    assert fingerprint.stale(tmp_path, "dedup") == "its input ../clean/ is gone"
    assert json.loads((folder / layout.FINGERPRINT).read_text())["input"]["stage"] == "../clean"
