"""Export in process: the split files and their sizes, counts, the swap that replaces a dataset whole, reviews,
the imagefolder layout and its file names."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from annotations import reviews
from annotations.reviews import ReviewApplier, Vote
from pipelines.executor import commit
from pipelines.export import ExportConfig, _safe_name, export, export_imagefolder
from surd import layout, shards
from surd.schema import SCHEMA, from_rows, split_for

IDS = [f"demo:{i}" for i in range(12)]


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def _run(tmp_path: Path) -> Path:
    """A run whose last finished stage is dedup: 12 rows in two shards."""
    run = tmp_path / "run"
    stage = layout.stage_dir(run, "dedup")
    for part in range(2):
        rows = [{"id": i, "source": "demo", "image": {"bytes": _png(n), "path": None}, "image_format": "PNG",
                 "keyword_prompt": f"kw {i}", "narrative_prompt": f"A picture of {i}."}
                for n, i in enumerate(IDS) if n % 2 == part]
        commit(stage, f"demo/part-{part:05d}", from_rows(rows), shards.empty_dropped(), len(rows), 0.1)
    shards.write_manifest(stage, "dedup")
    return run


def _dataset(run: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for path in sorted(layout.dataset_data_dir(run).glob("*.parquet")):
        split = path.name.split("-")[0]
        out.setdefault(split, []).extend(pq.read_table(path, columns=["id", "split"]).to_pylist())
    return out


def test_export_writes_each_split_with_the_stable_split(tmp_path: Path) -> None:
    run = _run(tmp_path)
    stats = export(run, ExportConfig(test_fraction=0.3))
    expected_test = {i for i in IDS if split_for(i, 0.3) == "test"}
    assert 0 < len(expected_test) < len(IDS)
    data = _dataset(run)
    assert {r["id"] for r in data["test"]} == expected_test and all(r["split"] == "test" for r in data["test"])
    assert {r["id"] for r in data["train"]} == set(IDS) - expected_test
    assert (stats["in"], stats["kept"]) == (12, 12)
    assert stats["counters"] == {"rows_test": len(expected_test), "rows_train": 12 - len(expected_test)}
    names = sorted(p.name for p in layout.dataset_data_dir(run).iterdir())
    assert names == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    manifest = shards.read_manifest(layout.stage_dir(run, "export"))
    assert manifest["input_stage"] == "dedup"
    assert manifest["splits"] == {"train": 12 - len(expected_test), "test": len(expected_test)}
    assert manifest["files"] == {"train": ["train-00000-of-00001.parquet"], "test": ["test-00000-of-00001.parquet"]}
    assert (layout.dataset_dir(run) / "README.md").read_text().startswith("---")
    assert pq.read_schema(layout.dataset_data_dir(run) / names[0]).equals(SCHEMA)


def test_small_parts_split_a_dataset_into_numbered_files(tmp_path: Path) -> None:
    run = _run(tmp_path)
    export(run, ExportConfig(test_fraction=0.0, shard_size_mb=1e-6))  # every batch is over the target size
    names = sorted(p.name for p in layout.dataset_data_dir(run).iterdir())
    assert names == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]  # one per input batch
    assert sorted(r["id"] for r in _dataset(run)["train"]) == sorted(IDS)
    assert not list(tmp_path.rglob("*.tmp.parquet"))


def test_a_new_export_replaces_the_old_one_whole_and_clears_leftovers(tmp_path: Path) -> None:
    run = _run(tmp_path)
    export(run, ExportConfig(test_fraction=0.5))
    (layout.dataset_dir(run) / "stale.txt").write_text("from the first export")
    leftover = run / ".surd.killed"  # a killed export's temp folder
    leftover.mkdir()
    export(run, ExportConfig(test_fraction=0.0))
    assert not (layout.dataset_dir(run) / "stale.txt").exists() and not leftover.exists()
    assert set(_dataset(run)) == {"train"}
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp or old copies left


def test_reviews_drop_rejected_rows_and_replace_edited_narratives(tmp_path: Path) -> None:
    run = _run(tmp_path)
    t0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    path = tmp_path / "reviews.parquet"
    reviews.write_reviews(path, reviews.resolve([Vote("demo:0", "a", "rejected", None, "bad_image", t0),
                                                 Vote("demo:1", "a", "edited", "A human wrote it.", None, t0)]))
    stats = export(run, ExportConfig(test_fraction=0.0), reviews=ReviewApplier(path))
    assert stats["dropped"] == {"review_rejected": 1}
    assert stats["counters"] == {"rows_train": 11, "review_rejected": 1, "review_edited": 1}
    table = pq.read_table(next(layout.dataset_data_dir(run).glob("train-*.parquet"))).to_pylist()
    by_id = {r["id"]: r for r in table}
    assert "demo:0" not in by_id
    assert (by_id["demo:1"]["narrative_prompt"], by_id["demo:1"]["review"]) == ("A human wrote it.", "edited")
    assert by_id["demo:2"]["review"] is None


def test_imagefolder_layout(tmp_path: Path) -> None:
    run = _run(tmp_path)
    export(run, ExportConfig(test_fraction=0.3, format="imagefolder"))
    folder = layout.imagefolder_dir(run)
    for split in ("train", "test"):
        lines = [json.loads(x) for x in (folder / split / "metadata.jsonl").read_text().splitlines()]
        ids = {i for i in IDS if split_for(i, 0.3) == split}
        assert {line["file_name"] for line in lines} == {f"{_safe_name(i)}.png" for i in ids}
        for line in lines:
            i = next(i for i in ids if line["file_name"].startswith(_safe_name(i)))
            assert line == {"file_name": f"{_safe_name(i)}.png", "text": f"A picture of {i}.", "prompt": f"kw {i}"}
            assert (folder / split / line["file_name"]).read_bytes() == _png(IDS.index(i))
    assert export_imagefolder(run) == folder  # rebuilt in place from the dataset


def test_safe_names_are_readable_bounded_and_unique() -> None:
    digest = hashlib.sha256(b"civitai:1/2").hexdigest()[:10]
    assert _safe_name("civitai:1/2") == f"civitai_1_2-{digest}"
    assert _safe_name("a-b_c") == f"a-b_c-{hashlib.sha256(b'a-b_c').hexdigest()[:10]}"
    long = _safe_name("x" * 200)
    assert long.startswith("x" * 80 + "-") and len(long) == 80 + 1 + 10
    assert _safe_name("a:b") != _safe_name("a/b")  # same readable part, different ids


@pytest.mark.parametrize(("fmt", "ext"), [("JPEG", "jpg"), ("WEBP", "webp"), (None, "png")])
def test_imagefolder_extensions(tmp_path: Path, fmt: str | None, ext: str) -> None:
    run = tmp_path / "run"
    data = layout.dataset_data_dir(run)
    data.mkdir(parents=True)
    pq.write_table(from_rows([{"id": "x:1", "image": {"bytes": b"img", "path": None}, "image_format": fmt,
                               "split": "train"}]), data / "train-00000-of-00001.parquet")
    export_imagefolder(run)
    files = sorted(p.name for p in (layout.imagefolder_dir(run) / "train").iterdir())
    assert files == sorted(["metadata.jsonl", f"{_safe_name('x:1')}.{ext}"])
    assert (layout.imagefolder_dir(run) / "train" / f"{_safe_name('x:1')}.{ext}").read_bytes() == b"img"
