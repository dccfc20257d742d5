"""DiffusionDB source on a small locally built copy (metadata Parquet + part zips), via paths and file:// URLs."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from surd.errors import SourceError
from surd.rows import Drop
from surd.sources import source_config


def png(i: int, size: tuple[int, int] = (24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (i * 40 % 256, 80, 120)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def ddb(tmp_path: Path) -> Path:
    """Two parts of three images; part 1 lists one image that is not in its zip and one without prompt."""
    root = tmp_path / "diffusiondb"
    (root / "images").mkdir(parents=True)
    rows = []
    for part in (1, 2):
        with zipfile.ZipFile(root / "images" / f"part-{part:06d}.zip", "w") as z:
            prompts = {}
            for k in range(3):
                name = f"img-{part}-{k}.png"
                z.writestr(name, png(part * 10 + k))
                prompts[name] = {"p": f"json prompt {part}-{k}", "se": 7 + k, "c": 7.0, "st": 50, "sa": "k_lms"}
                rows.append({"image_name": name, "prompt": f"a painting {part}-{k}, trending on artstation",
                             "part_id": part, "seed": 100 + k, "step": 50, "cfg": 7.5, "sampler": 8,
                             "width": 24, "height": 16, "user_name": "abc123", "image_nsfw": 0.1, "prompt_nsfw": 0.0,
                             "timestamp": datetime(2022, 8, 7, tzinfo=timezone.utc)})
            z.writestr(f"part-{part:06d}.json", json.dumps(prompts))
    rows.append({**rows[0], "image_name": "not-in-zip.png"})
    rows[1]["prompt"] = None
    pq.write_table(pa.Table.from_pylist(rows), root / "metadata.parquet")
    return root


def read(config: dict) -> list:
    source = source_config({"type": "diffusiondb", **config}).build()
    return [r for p in source.list_partitions() for r in source.read_partition(p)]


def test_reads_chosen_parts_with_metadata(ddb: Path) -> None:
    results = read({"root": str(ddb), "parts": [1]})
    kept = [r for r in results if not isinstance(r, Drop)]
    dropped = {r.row["source_id"]: r.reason for r in results if isinstance(r, Drop)}
    assert [r["source_id"] for r in kept] == ["img-1-0.png", "img-1-2.png"]
    assert dropped == {"img-1-1.png": "no_prompt", "not-in-zip.png": "image_missing"}
    row = kept[0]
    assert row["id"] == "diffusiondb:img-1-0.png"
    assert row["keyword_prompt_raw"] == "a painting 1-0, trending on artstation"
    assert row["image"]["bytes"] == png(10)
    assert row["sha256"] == hashlib.sha256(png(10)).hexdigest()
    assert (row["width"], row["height"], row["image_format"]) == (24, 16, "PNG")
    meta = json.loads(row["gen_meta"])
    assert (meta["sampler"], meta["steps"], meta["cfg"], meta["seed"], meta["image_nsfw"]) == ("k_lms", 50, 7.5, 100,
                                                                                                 pytest.approx(0.1))


def test_file_url_and_part_selection(ddb: Path) -> None:
    results = read({"root": f"file://{ddb}", "parts": [2]})
    assert [r["source_id"] for r in results] == ["img-2-0.png", "img-2-1.png", "img-2-2.png"]


def test_part_json_when_no_metadata_table(ddb: Path) -> None:
    results = read({"root": str(ddb), "parts": [1], "metadata": None})
    assert [r["keyword_prompt_raw"] for r in results] == [f"json prompt 1-{k}" for k in range(3)]
    assert json.loads(results[0]["gen_meta"])["sampler"] == "k_lms"


def test_missing_or_broken_part_names_the_file(ddb: Path) -> None:
    with pytest.raises(SourceError, match="part-000009.zip"):
        read({"root": str(ddb), "parts": [9]})
    (ddb / "images" / "part-000003.zip").write_bytes(b"not a zip")
    with pytest.raises(SourceError, match="part-000003.zip"):
        read({"root": str(ddb), "parts": [3]})


def test_collect_then_fetch_passes_rows_through(ddb: Path, tmp_path: Path) -> None:
    from pipelines.collect import collect
    from pipelines.local import run_stage
    from surd.fetch import FetchConfig

    run = tmp_path / "run"
    config = source_config({"type": "diffusiondb", "root": str(ddb), "parts": [2, 1]})
    stats = collect(run, config, progress=False)
    assert (stats["kept"], stats["dropped"]) == (5, {"no_prompt": 1, "image_missing": 1})
    fetched = run_stage(run, "fetch", FetchConfig(), progress=False)
    assert (fetched["kept"], fetched["dropped"]) == (5, {})
    before = pq.read_table(run / "collect" / "diffusiondb" / "part-00000.parquet")
    after = pq.read_table(run / "fetch" / "diffusiondb" / "part-00000.parquet")
    assert after.equals(before)
