"""What mutation testing found untested in export: when a split's part is cut, the atomic exchange and its
fallback, the recipe name read back, and the imagefolder metadata's bytes whatever the locale."""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_export_rules import IDS, _run

from annotations.reviews import ReviewApplier, Vote, resolve, write_reviews
from pipelines import fingerprint
from pipelines.executor import commit
from pipelines.export import (
    ExportConfig,
    _safe_name,
    _SplitWriter,
    exchange,
    export,
    export_imagefolder,
    last_recipe_name,
    reviews_digest,
    swap_in,
)
from surd import layout, shards
from surd.schema import from_rows, split_for

ROOT = Path(__file__).resolve().parents[1]


def _table(n: int) -> pa.Table:
    return pa.table({"id": [f"x:{i}" for i in range(n)]})


def test_split_writer_cuts_a_part_when_the_pending_bytes_reach_the_target(tmp_path: Path) -> None:
    small, large = _table(3), _table(5)
    assert 0 < small.nbytes < large.nbytes
    at_limit = _SplitWriter(tmp_path, "train", small.nbytes)
    at_limit.add(small)  # exactly the target: cut now
    assert len(at_limit.parts) == 1 and at_limit.pending == [] and at_limit.pending_bytes == 0
    below = _SplitWriter(tmp_path / "below", "train", small.nbytes + 1)
    (tmp_path / "below").mkdir()
    below.add(small)  # one byte short: kept pending
    assert below.parts == [] and below.pending_bytes == small.nbytes
    summed = _SplitWriter(tmp_path / "summed", "test", large.nbytes + 1)
    (tmp_path / "summed").mkdir()
    summed.add(large)
    summed.add(small)  # neither alone reaches the target, the two together do
    assert [p.name for p in summed.parts] == ["test-00000.tmp.parquet"] and summed.rows == 8
    assert pq.read_table(summed.parts[0]).num_rows == 8
    summed.add(_table(0))
    assert summed.rows == 8 and summed.pending == []


def test_parts_are_zstd_parquet_in_row_groups_of_256(tmp_path: Path) -> None:
    # Small row groups keep a reader of image rows (the HF viewer, a streaming loader) from holding megabytes.
    writer = _SplitWriter(tmp_path, "train", 1 << 30)
    writer.add(_table(600))
    assert writer.finalise() == ["train-00000-of-00001.parquet"]
    meta = pq.ParquetFile(tmp_path / "train-00000-of-00001.parquet").metadata
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    assert [g.num_rows for g in groups] == [256, 256, 88]
    assert {g.column(0).compression for g in groups} == {"ZSTD"}


def test_exchange_swaps_two_folders(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "from_a").write_text("a")
    (b / "from_b").write_text("b")
    assert exchange(a, b) is True
    assert [p.name for p in a.iterdir()] == ["from_b"] and [p.name for p in b.iterdir()] == ["from_a"]


def test_swap_in_leaves_only_the_new_copy(tmp_path: Path) -> None:
    new, target = tmp_path / ".new", tmp_path / "target"
    new.mkdir(), target.mkdir()
    (new / "version").write_text("new")
    (target / "version").write_text("old")
    swap_in(new, target)  # by the atomic exchange here: `new` then holds the old copy, which is removed
    assert (target / "version").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


def test_exchange_a_missing_path_is_an_error_naming_both(tmp_path: Path) -> None:
    a, missing = tmp_path / "a", tmp_path / "missing"
    a.mkdir()
    with pytest.raises(OSError) as info:
        exchange(a, missing)
    assert info.value.errno == errno.ENOENT
    assert info.value.strerror == f"cannot exchange {a} and {missing}: {os.strerror(errno.ENOENT)}"


def test_exchange_the_kernel_refuses_falls_back(tmp_path: Path) -> None:
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    assert exchange(tmp_path / "a", inner) is False  # EINVAL: a folder cannot trade places with its own child
    assert inner.is_dir()


def test_without_linux_or_renameat2_swap_in_uses_two_renames(tmp_path: Path, monkeypatch) -> None:
    def replaced(n: int) -> tuple[Path, Path]:
        new, target = tmp_path / f"new{n}", tmp_path / f"target{n}"
        new.mkdir(), target.mkdir()
        (new / "version").write_text("new")
        (target / "version").write_text("old")
        return new, target

    new, target = replaced(1)
    with monkeypatch.context() as m:
        m.setattr(sys, "platform", "darwin")
        assert exchange(new, target) is False
        swap_in(new, target)
    assert (target / "version").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target1"]  # the old copy is gone too

    new, target = replaced(2)

    class OldLibc:  # a C library without the renameat2 wrapper (glibc < 2.28)
        pass

    with monkeypatch.context() as m:
        m.setattr(ctypes, "CDLL", lambda *args, **kwargs: OldLibc())
        assert exchange(new, target) is False
        swap_in(new, target)
    assert (target / "version").read_text() == "new" and not new.exists()


def test_last_recipe_name_is_the_one_the_export_was_made_with(tmp_path: Path) -> None:
    run = _run(tmp_path)
    assert last_recipe_name(run) is None  # no export yet
    export(run, ExportConfig(), recipe_name="lighthouses")
    assert last_recipe_name(run) == "lighthouses"


IMAGEFOLDER_IN_ASCII_LOCALE = """
import sys
from pathlib import Path
from pipelines.export import export_imagefolder
assert open(sys.argv[2], "w").encoding.lower() not in ("utf-8", "utf8"), "the locale is UTF-8 after all"
export_imagefolder(Path(sys.argv[1]))
"""


def test_imagefolder_metadata_is_utf8_text_whatever_the_locale(tmp_path: Path) -> None:
    prompt, narrative = "café, 東京, ✨", "Ein Café in Tōkyō."
    runs = []
    for name in ("here", "ascii"):
        run = tmp_path / name
        data = layout.dataset_data_dir(run)
        data.mkdir(parents=True)
        row = {"id": "x:1", "image": {"bytes": b"img", "path": None}, "image_format": "PNG", "split": "train",
               "keyword_prompt": prompt, "narrative_prompt": narrative}
        pq.write_table(from_rows([row]), data / "train-00000-of-00001.parquet")
        runs.append(run)
    export_imagefolder(runs[0])
    # A user whose locale is plain ASCII (LC_ALL=C without Python's UTF-8 mode) gets the same file.
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0",
           "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), str(ROOT)]).strip(os.pathsep)}
    subprocess.run([sys.executable, "-c", IMAGEFOLDER_IN_ASCII_LOCALE, str(runs[1]), str(tmp_path / "probe")],
                   env=env, check=True, timeout=120)
    for run in runs:
        raw = (layout.imagefolder_dir(run) / "train" / "metadata.jsonl").read_bytes()
        # Written as text, not as \\u escapes: readable by people and by tools that read the original SURD layout.
        record = {"file_name": f"{_safe_name('x:1')}.png", "text": narrative, "prompt": prompt}
        assert raw.decode("utf-8") == json.dumps(record, ensure_ascii=False) + "\n"
        assert prompt.encode() in raw


# ---- export() as a whole: defaults, what a rerun leaves alone, the imagefolder beside it, reviews, the input ----


def _files(run: Path) -> dict[str, tuple[int, int]]:
    """Each dataset file's inode and mtime: a rewritten file changes them."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in layout.dataset_data_dir(run).iterdir()}


def test_a_default_export_is_quiet_named_surd_and_records_its_input(tmp_path: Path, capfd) -> None:
    run = _run(tmp_path)
    stats = export(run, ExportConfig())
    assert capfd.readouterr().err == ""  # no progress bar, no notice unless asked for
    assert stats["kept"] == 12 and last_recipe_name(run) == "surd"
    card = (layout.dataset_dir(run) / "README.md").read_text()
    assert "# SURD (surd)" in card and "rows exported from the `dedup` stage" in card
    files = sorted(p.name for p in layout.dataset_data_dir(run).iterdir())
    header = yaml.safe_load(card.split("---")[1])
    assert header["dataset_info"]["download_size"] == sum(
        (layout.dataset_data_dir(run) / name).stat().st_size for name in files)
    manifest = json.loads((layout.stage_dir(run, "export") / "manifest.json").read_text())
    assert manifest["stage"] == "export" and manifest["input_stage"] == "dedup"
    assert sorted(manifest["files"]["train"] + manifest["files"]["test"]) == files
    assert sum(manifest["splits"].values()) == 12


def test_a_rerun_leaves_the_dataset_alone_and_a_missing_one_is_written_again(tmp_path: Path) -> None:
    run = _run(tmp_path)
    export(run, ExportConfig(test_fraction=0.3))
    before = _files(run)
    export(run, ExportConfig(test_fraction=0.3, batch_size=3))  # the batch size does not shape the rows
    assert _files(run) == before and not layout.imagefolder_dir(run).exists()
    export(run, ExportConfig(test_fraction=0.3, format="imagefolder"))  # nor does the format: only added beside
    assert _files(run) == before and (layout.imagefolder_dir(run) / "train" / "metadata.jsonl").is_file()
    shutil.rmtree(layout.imagefolder_dir(run))
    export(run, ExportConfig(test_fraction=0.3, format="imagefolder"))
    assert _files(run) == before and (layout.imagefolder_dir(run) / "train" / "metadata.jsonl").is_file()
    shutil.rmtree(layout.dataset_dir(run))
    export(run, ExportConfig(test_fraction=0.3))
    assert sorted(_files(run)) == sorted(before)


def test_a_rebuilt_export_replaces_the_imagefolder_beside_it(tmp_path: Path, capfd) -> None:
    run = _run(tmp_path)
    export(run, ExportConfig(test_fraction=0.3, format="imagefolder"))
    capfd.readouterr()
    export(run, ExportConfig(test_fraction=0.2, format="imagefolder"))  # rebuilt, and the imagefolder with it
    assert capfd.readouterr().err == "export: test_fraction 0.3 -> 0.2; rebuilding export\n"  # nothing removed
    lines = (layout.imagefolder_dir(run) / "test" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == sum(split_for(i, 0.2) == "test" for i in IDS)
    export(run, ExportConfig(test_fraction=0.1))  # a Parquet export: the imagefolder would be stale, so it goes
    assert not layout.imagefolder_dir(run).exists()
    assert capfd.readouterr().err.splitlines()[-1] == ("surd-imagefolder: removed, it held the previous export "
                                              "(`surd export RUN --format imagefolder` writes it again)")


def test_the_default_export_runs_its_row_logic_in_this_process(tmp_path: Path) -> None:
    class LocalReviews:  # defined in a function: it could not be sent to a worker process
        def setup(self) -> None:
            self.ready = True

        def process_batch(self, rows: list[dict]) -> list[dict]:
            return rows

    reviews = LocalReviews()
    assert export(_run(tmp_path), ExportConfig(), reviews=reviews)["kept"] == 12
    assert reviews.ready


def _reviews(path: Path, rejected: str) -> ReviewApplier:
    t0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    write_reviews(path, resolve([Vote(rejected, "a", "rejected", None, "bad_image", t0)]))
    return ReviewApplier(path)


def test_a_changed_reviews_file_rebuilds_the_export(tmp_path: Path) -> None:
    run, path = _run(tmp_path), tmp_path / "reviews.parquet"
    export(run, ExportConfig(test_fraction=0.0), reviews=_reviews(path, "demo:0"))
    record = fingerprint.read(layout.stage_dir(run, "export"))
    assert record["settings"]["reviews"] == hashlib.sha256(path.read_bytes()).hexdigest()
    export(run, ExportConfig(test_fraction=0.0), reviews=_reviews(path, "demo:2"))
    ids = {r["id"] for r in pq.read_table(layout.dataset_data_dir(run), columns=["id"]).to_pylist()}
    assert ids == set(IDS) - {"demo:2"}


def test_reviews_digest_names_what_the_export_applied(tmp_path: Path) -> None:
    class Reviews:
        def __init__(self, path: Path | None) -> None:
            if path is not None:
                self.reviews_path = path

    assert reviews_digest(None) is None
    assert reviews_digest(Reviews(None)) == "Reviews"  # no file to hash: the processor's kind
    assert reviews_digest(Reviews(tmp_path / "missing.parquet")) == "Reviews"
    (tmp_path / "r.parquet").write_bytes(b"decisions")
    assert reviews_digest(Reviews(tmp_path / "r.parquet")) == hashlib.sha256(b"decisions").hexdigest()


def test_export_from_an_earlier_stage(tmp_path: Path) -> None:
    run = _run(tmp_path)
    stage = layout.stage_dir(run, "clean")
    rows = [{"id": f"clean:{i}", "source": "demo"} for i in range(5)]
    commit(stage, "demo/part-00000", from_rows(rows), shards.empty_dropped(), 5, 0.1)
    shards.write_manifest(stage, "clean")
    assert export(run, ExportConfig(test_fraction=0.0), source="clean")["kept"] == 5
    ids = {r["id"] for r in pq.read_table(layout.dataset_data_dir(run), columns=["id"]).to_pylist()}
    assert ids == {r["id"] for r in rows}
    assert "rows exported from the `clean` stage" in (layout.dataset_dir(run) / "README.md").read_text()


def _big_run(tmp_path: Path, shard_rows: list[int], image_bytes: int) -> Path:
    run = tmp_path / "run"
    stage = layout.stage_dir(run, "dedup")
    n = 0
    for part, count in enumerate(shard_rows):
        rows = [{"id": f"demo:{n + i}", "image": {"bytes": bytes(image_bytes), "path": None}} for i in range(count)]
        n += count
        commit(stage, f"demo/part-{part:05d}", from_rows(rows), shards.empty_dropped(), count, 0.1)
    shards.write_manifest(stage, "dedup")
    return run


def _part_rows(run: Path) -> list[int]:
    return [pq.read_metadata(p).num_rows for p in sorted(layout.dataset_data_dir(run).glob("train-*.parquet"))]


@pytest.mark.parametrize(("shard_size_mb", "parts"), [(1.0, [6, 6]), (4.0, [12])])
def test_parts_are_cut_at_shard_size_mb_mebibytes(tmp_path: Path, shard_size_mb: float, parts: list[int]) -> None:
    run = _big_run(tmp_path, [6, 6], 300 << 10)  # two input shards of 6 rows, 1.8 MiB each
    export(run, ExportConfig(test_fraction=0.0, shard_size_mb=shard_size_mb))
    assert _part_rows(run) == parts


def test_parts_are_built_from_batches_of_512_rows(tmp_path: Path) -> None:
    run = _big_run(tmp_path, [600], 1)
    export(run, ExportConfig(test_fraction=0.0, shard_size_mb=1e-6))  # every batch reaches the target at once
    assert _part_rows(run) == [512, 88]
