"""Crafted inputs that once hung or crashed the source readers: each is now a dropped row, in milliseconds.

Each test builds its own hostile input (issue #11, finding 4). The timeouts are far above what the bounded
readers need, and far below what the unbounded ones took (minutes, or for ever).
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zipfile
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from surd.rows import Drop
from surd.sources import source_config
from surd.sources.folder import FolderConfig
from surd.sources.imagefolder import ImageFolderConfig
from surd.sources.metadata import read_embedded
from surd.sources.tabular import JsonlConfig

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")


def tiny_png(texts: dict[str, str] | None = None) -> bytes:
    info = PngInfo()
    for key, value in (texts or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def png_with_chunk(kind: bytes, body: bytes) -> bytes:
    """A 1x1 PNG with one extra chunk right after IHDR, written by hand (PngInfo cannot write 50 MB fast)."""
    data = tiny_png()
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return data[:33] + chunk + data[33:]


def collect(config) -> list:
    source = config.build()
    return [item for part in source.list_partitions() for item in source.read_partition(part)]


def only_drop(items: list) -> Drop:
    (item,) = items
    assert isinstance(item, Drop), item
    return item


# A ComfyUI graph whose string nodes link to each other in a cycle. The old walker tried every string-like
# input of every node to depth 20: 4^20 calls.
CYCLE = {
    "1": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 1, "cfg": 1, "sampler_name": "euler",
                                               "model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                                               "latent_image": ["2", 0]}},
    "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m"}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": ["4", 0], "clip": ["2", 1]}},
    "4": {"class_type": "X", "inputs": {"text": ["5", 0], "string": ["5", 0], "value": ["5", 0], "prompt": ["5", 0]}},
    "5": {"class_type": "X", "inputs": {"text": ["4", 0], "string": ["4", 0], "value": ["4", 0], "prompt": ["4", 0]}},
}


@pytest.mark.timeout(5)
def test_comfyui_graph_with_a_cycle_is_walked_once(tmp_path):
    data = tiny_png({"prompt": json.dumps(CYCLE, separators=(",", ":"))})
    assert len(data) < 620  # the whole attack fits in a few hundred bytes
    start = time.perf_counter()
    assert read_embedded(data) is None
    (tmp_path / "cycle.png").write_bytes(data)
    drop = only_drop(collect(FolderConfig(path=tmp_path)))
    assert drop.reason == "no_prompt" and "cycle" in drop.detail
    assert time.perf_counter() - start < 1.0


@pytest.mark.timeout(10)
def test_50mb_parameters_chunk_is_dropped_unread(tmp_path):
    body = b"parameters\0" + b"a" * (50 << 20)  # no colon anywhere: the old settings regex went quadratic
    (tmp_path / "huge.png").write_bytes(png_with_chunk(b"tEXt", body))
    start = time.perf_counter()
    drop = only_drop(collect(FolderConfig(path=tmp_path)))
    assert drop.reason == "metadata_too_large" and "parameters" in drop.detail
    assert time.perf_counter() - start < 2.0


@pytest.mark.timeout(10)
def test_long_infotext_without_colons_parses_in_linear_time(tmp_path):
    text = "word " * ((7 << 20) // 5)  # 7 MiB: under the chunk bound, so it is parsed
    start = time.perf_counter()
    info = read_embedded(png_with_chunk(b"tEXt", b"parameters\0" + text.encode()))
    assert info.prompt == text.strip() and info.gen_meta == {}
    assert time.perf_counter() - start < 2.0


@pytest.mark.timeout(10)
def test_3mb_sidecar_txt_without_colons(tmp_path):
    (tmp_path / "a.png").write_bytes(tiny_png())
    text = ("masterpiece " * ((3 << 20) // 12)).strip()
    (tmp_path / "a.txt").write_text(text)
    start = time.perf_counter()
    (row,) = collect(FolderConfig(path=tmp_path))
    assert row["keyword_prompt_raw"] == text  # a sidecar says outright that its text is the prompt
    assert time.perf_counter() - start < 2.0


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.timeout(10)
def test_deep_json_sidecar_is_dropped(tmp_path):
    (tmp_path / "a.png").write_bytes(tiny_png())
    (tmp_path / "a.json").write_text('{"prompt": "x", "extra": ' + DEEP + "}")
    drop = only_drop(collect(FolderConfig(path=tmp_path)))
    assert drop.reason == "json_too_deep" and "a.json" in drop.detail


@pytest.mark.timeout(10)
def test_deep_json_in_a_png_chunk_is_dropped(tmp_path):
    (tmp_path / "a.png").write_bytes(tiny_png({"prompt": DEEP}))
    drop = only_drop(collect(FolderConfig(path=tmp_path)))
    assert drop.reason == "json_too_deep"


@pytest.mark.timeout(10)
def test_deep_json_line_in_jsonl_is_dropped(tmp_path):
    lines = [json.dumps({"prompt": "a fox", "url": "https://example.org/a.png"}),
             '{"prompt": "deep", "url": "https://example.org/b.png", "x": ' + DEEP + "}",
             json.dumps({"prompt": "a hare", "url": "https://example.org/c.png"})]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    items = collect(JsonlConfig(path=tmp_path / "rows.jsonl", image_url_column="url"))
    assert [i.reason if isinstance(i, Drop) else i["keyword_prompt_raw"] for i in items] == [
        "a fox", "json_too_deep", "a hare"]
    assert "rows.jsonl:2" in items[1].detail


@pytest.mark.timeout(10)
def test_deep_json_line_in_metadata_jsonl_is_dropped(tmp_path):
    (tmp_path / "ok.png").write_bytes(tiny_png())
    lines = ['{"file_name": "ok.png", "prompt": "p", "x": ' + DEEP + "}", json.dumps({"file_name": "ok.png",
                                                                                        "prompt": "a castle"})]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    items = collect(ImageFolderConfig(path=tmp_path))
    assert isinstance(items[0], Drop) and items[0].reason == "json_too_deep" and "line 1" in items[0].detail
    assert items[1]["keyword_prompt_raw"] == "a castle"


@pytest.mark.timeout(10)
def test_jsonl_line_longer_than_the_bound_is_dropped_without_reading_it_whole(tmp_path, monkeypatch):
    from surd.sources import localfiles

    monkeypatch.setattr(localfiles, "MAX_LINE_BYTES", 1000)
    lines = [json.dumps({"prompt": "x" * 5000, "url": "https://example.org/a.png"}),
             json.dumps({"prompt": "a hare", "url": "https://example.org/c.png"})]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    items = collect(JsonlConfig(path=tmp_path / "rows.jsonl", image_url_column="url", rows_per_shard=1))
    assert [i.reason if isinstance(i, Drop) else i["keyword_prompt_raw"] for i in items] == [
        "metadata_too_large", "a hare"]


@pytest.mark.timeout(10)
def test_imagefolder_file_name_naming_a_fifo_is_skipped(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would block until a writer comes: never
    (tmp_path / "ok.png").write_bytes(tiny_png())
    lines = [json.dumps({"file_name": "pipe.png", "prompt": "a fox"}), json.dumps({"file_name": "ok.png",
                                                                                     "prompt": "a hare"})]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    items = collect(ImageFolderConfig(path=tmp_path))
    assert isinstance(items[0], Drop) and items[0].reason == "not_a_regular_file" and "pipe.png" in items[0].detail
    assert items[1]["keyword_prompt_raw"] == "a hare"


@pytest.mark.timeout(10)
def test_table_image_path_naming_a_fifo_is_skipped(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    pq.write_table(pa.table({"prompt": ["a fox"], "file": ["pipe.png"]}), tmp_path / "t.parquet")
    drop = only_drop(collect(source_config({"type": "parquet", "path": str(tmp_path / "t.parquet"),
                                            "image_column": "file"})))
    assert drop.reason == "not_a_regular_file"


@pytest.mark.timeout(10)
def test_folder_partition_naming_a_fifo_is_skipped(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "pipe.txt").write_text("a prompt for a pipe")
    source = FolderConfig(path=tmp_path).build()
    assert source.list_partitions() == []  # never listed...
    (drop,) = source.read_partition(["pipe.png"])  # ...and refused when a stale listing names it
    assert isinstance(drop, Drop) and drop.reason == "not_a_regular_file"


def deflated_zeros(size: int) -> tuple[bytes, int]:
    """Raw deflate of `size` zero bytes (a multiple of 1 MiB) and its CRC-32, built without `size` bytes of work."""
    mib = bytes(1 << 20)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(mib) + comp.flush(zlib.Z_FULL_FLUSH)
    # a full flush resets the compressor, so every further MiB of zeros compresses to the very same bytes
    assert comp.compress(mib) + comp.flush(zlib.Z_FULL_FLUSH) == block
    crc = 0
    for _ in range(size >> 20):
        crc = zlib.crc32(mib, crc)
    return block * (size >> 20) + comp.flush(), crc


def write_zip(path: Path, members: list[tuple[str, bytes, int, int, int]]) -> None:
    """A zip from (name, stored bytes, method, crc, uncompressed size) tuples, laid out as the spec says."""
    out, central = bytearray(), bytearray()
    for name, data, method, crc, size in members:
        raw = name.encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data), size, len(raw), 0)
        out += raw + data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(data), size,
                               len(raw), 0, 0, 0, 0, 0, offset) + raw
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))


@pytest.mark.timeout(20)
def test_diffusiondb_member_of_1_5_gib_is_dropped_unread(tmp_path):
    root = tmp_path / "ddb"
    (root / "images").mkdir(parents=True)
    small = tiny_png()
    bomb, crc = deflated_zeros(1536 << 20)
    write_zip(root / "images" / "part-000001.zip", [
        ("big.png", bomb, zipfile.ZIP_DEFLATED, crc, 1536 << 20),
        ("small.png", small, zipfile.ZIP_STORED, zlib.crc32(small), len(small)),
    ])
    assert (root / "images" / "part-000001.zip").stat().st_size < 2 << 20
    pq.write_table(pa.Table.from_pylist([
        {"image_name": name, "prompt": f"prompt of {name}", "part_id": 1} for name in ("big.png", "small.png")
    ]), root / "metadata.parquet")
    source = source_config({"type": "diffusiondb", "root": str(root), "parts": [1]}).build()
    start = time.perf_counter()
    big, kept = list(source.read_partition(1))
    assert time.perf_counter() - start < 2.0
    assert isinstance(big, Drop) and big.reason == "member_too_large" and "big.png" in big.detail
    assert kept["image"]["bytes"] == small


def test_diffusiondb_member_that_lies_about_its_size_is_cut_off(tmp_path):
    """A member whose header says 10 bytes but inflates to more is read no further than the bound."""
    from surd.sources import diffusiondb

    root = tmp_path / "ddb"
    (root / "images").mkdir(parents=True)
    bomb, crc = deflated_zeros(4 << 20)
    write_zip(root / "images" / "part-000001.zip", [("liar.png", bomb, zipfile.ZIP_DEFLATED, crc, 10)])
    pq.write_table(pa.Table.from_pylist([{"image_name": "liar.png", "prompt": "p", "part_id": 1}]),
                   root / "metadata.parquet")
    source = source_config({"type": "diffusiondb", "root": str(root), "parts": [1],
                            "max_member_bytes": 1 << 20}).build()
    (drop,) = source.read_partition(1)
    assert isinstance(drop, Drop) and drop.reason in ("member_too_large", "bad_member")
    assert diffusiondb.DiffusionDBConfig(parts=[1]).max_member_bytes >= 16 << 20
