"""What mutation testing found untested in the local sources: Parquet row ranges inside one row group, the columns
kept in gen_meta, every file of a folder, the errors a user reads, and the stable id of a malformed item."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tracemalloc
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from surd.errors import SourceError
from surd.sources import bounds
from surd.sources.bounds import OverBound
from surd.sources.genmeta import MAX_DEPTH, as_int, fallback_id, gen_meta_json, json_safe
from surd.sources.imagefolder import ImageFolderConfig
from surd.sources.tabular import JsonlConfig, ParquetConfig


def _table(path: Path, n: int, **extra: pa.Array) -> None:
    columns = {"prompt": [f"p{i}" for i in range(n)], "url": [f"https://x/{i}.png" for i in range(n)], **extra}
    pq.write_table(pa.table(columns), path, row_group_size=max(n, 1))


def test_row_ranges_inside_one_row_group_yield_each_row_once_with_its_index(tmp_path: Path) -> None:
    _table(tmp_path / "t.parquet", 10)  # one row group of 10 rows, partitions of 4: two start inside it
    source = ParquetConfig(path=tmp_path / "t.parquet", image_url_column="url", rows_per_shard=4).build()
    parts = source.list_partitions()
    assert [(p["start"], p["stop"]) for p in parts] == [(0, 4), (4, 8), (8, 10)]
    ids = [[r["id"] for r in source.read_partition(p)] for p in parts]
    assert ids == [[f"parquet:t.parquet:{i}" for i in range(a, b)] for a, b in ((0, 4), (4, 8), (8, 10))]
    assert [r["keyword_prompt_raw"] for r in source.read_partition(parts[1])] == ["p4", "p5", "p6", "p7"]


def test_meta_columns_keep_exactly_the_named_columns_whatever_their_type(tmp_path: Path) -> None:
    sampler = pa.array(["euler", "ddim"]).dictionary_encode()  # a categorical column: not a plain string type
    _table(tmp_path / "t.parquet", 2, sampler=sampler, steps=pa.array([20, 30]), cfg=pa.array([7.0, 5.5]))
    named = ParquetConfig(path=tmp_path, image_url_column="url", meta_columns=["sampler", "cfg"]).build()
    rows = [r for p in named.list_partitions() for r in named.read_partition(p)]
    assert [json.loads(r["gen_meta"])["source_meta"] for r in rows] == [{"sampler": "euler", "cfg": 7.0},
                                                                        {"sampler": "ddim", "cfg": 5.5}]
    plain = tmp_path / "plain"
    plain.mkdir()
    _table(plain / "t.parquet", 2, steps=pa.array([20, 30]), tags=pa.array([["a"], ["b"]]), cfg=pa.array([7.0, 5.5]))
    default = ParquetConfig(path=plain, image_url_column="url").build()
    (first, _) = [r for p in default.list_partitions() for r in default.read_partition(p)]
    assert json.loads(first["gen_meta"])["source_meta"] == {"steps": 20, "cfg": 7.0}  # the scalar columns


def test_every_file_of_a_folder_is_listed(tmp_path: Path) -> None:
    for name in ("a.parquet", "sub/b.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _table(tmp_path / name, 3)
    source = ParquetConfig(path=tmp_path, image_url_column="url", rows_per_shard=2).build()
    assert [(p["file"], p["start"]) for p in source.list_partitions()] == [
        ("a.parquet", 0), ("a.parquet", 2), ("sub/b.parquet", 0), ("sub/b.parquet", 2)]
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text('{"prompt": "p", "url": "https://x/1.png"}\n')
    lines = JsonlConfig(path=tmp_path, image_url_column="url").build()
    assert [p["file"] for p in lines.list_partitions()] == ["a.jsonl", "b.jsonl"]


def test_errors_name_the_source_kind_and_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(SourceError) as info:
        ParquetConfig(path=missing, image_url_column="url").build().list_partitions()
    assert str(info.value) == f"parquet source: {missing} does not exist"
    with pytest.raises(SourceError) as info:
        JsonlConfig(path=tmp_path, image_url_column="url").build().list_partitions()
    assert str(info.value) == f"jsonl source: no *.jsonl files under {tmp_path}"
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(SourceError) as info:
        ParquetConfig(path=tmp_path, image_url_column="url").build().list_partitions()
    assert str(info.value).startswith(f"parquet source: cannot read {tmp_path.resolve() / 'bad.parquet'}: ")
    (tmp_path / "a.jsonl").write_text("{}\n")
    with pytest.raises(SourceError) as info:
        list(JsonlConfig(path=tmp_path, image_url_column="url").build().read_partition({"file": "../x.jsonl"}))
    assert str(info.value) == f"jsonl source: listed file '../x.jsonl' is outside {tmp_path.resolve()}"


def test_fallback_id_is_a_hash_of_the_item_in_sorted_key_order() -> None:
    item = {"b": 1, "a": [2, None]}
    digest = hashlib.sha256(b'{"a": [2, null], "b": 1}').hexdigest()[:16]
    assert fallback_id("src", item) == f"src:malformed-{digest}"
    assert fallback_id("src", {"a": [2, None], "b": 1}) == fallback_id("src", item)  # key order does not matter
    assert fallback_id("src", [1]) != fallback_id("src", [2])
    assert fallback_id("src", float("nan")) == f"src:malformed-{hashlib.sha256(b'null').hexdigest()[:16]}"


def test_bad_json_lines_are_dropped_under_their_file_and_line(tmp_path: Path) -> None:
    broken = "{bad"
    try:
        json.loads(broken)
    except ValueError as e:
        problem = str(e)
    lines = ["[1]", broken, "[" * 70 + "]" * 70, '{"prompt": "p", "url": "https://x/4.png"}']
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    source = JsonlConfig(path=tmp_path, image_url_column="url").build()
    results = [r for p in source.list_partitions() for r in source.read_partition(p)]
    drops = [(d.reason, d.detail, d.row) for d in results[:3]]
    assert drops == [
        ("bad_json_line", "a.jsonl:1: not a JSON object", {"id": "jsonl:a.jsonl:1", "source": "jsonl"}),
        ("bad_json_line", f"a.jsonl:2: {problem}", {"id": "jsonl:a.jsonl:2", "source": "jsonl"}),
        ("json_too_deep", "a.jsonl:3: JSON nested deeper than 64", {"id": "jsonl:a.jsonl:3", "source": "jsonl"}),
    ]
    assert results[3]["id"] == "jsonl:a.jsonl:4"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_table_rows_and_drops_known_answers(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png())
    records = [
        {"key": "k1", "prompt": "a fox", "file": "img\\a.png", "neg": "blurry", "simple": "  A fox.  ", "seed": 3},
        {"key": "", "prompt": "p", "file": "https://x/2.png"},
        {"key": "k3", "prompt": "p", "file": "https://x/3.png", "url": "https://y/3.png"},
        {"key": "k4", "prompt": " "},
        {"key": "k5", "prompt": "p", "url": "ftp://x/5.png"},
        {"key": "k6", "prompt": "p"},
        {"key": "k7", "prompt": "p", "file": "s3://bucket/7.png"},
        {"key": "k8", "prompt": "p", "file": "../o.png"},
        {"key": "k9", "prompt": "p", "file": "img/none.png"},
    ]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    source = JsonlConfig(path=tmp_path, prompt_column="prompt", image_column="file", image_url_column="url",
                         negative_prompt_column="neg", narrative_column="simple", id_column="key").build()
    out = [r for p in source.list_partitions() for r in source.read_partition(p)]
    first = out[0]
    assert {k: first[k] for k in ("id", "source", "source_id", "image_url", "keyword_prompt_raw", "negative_prompt",
                                  "narrative_prompt", "narrative_origin")} == {
        "id": "jsonl:k1", "source": "jsonl", "source_id": "k1", "image_url": None, "keyword_prompt_raw": "a fox",
        "negative_prompt": "blurry", "narrative_prompt": "A fox.", "narrative_origin": "source"}
    assert first["image"] == {"bytes": _png(), "path": "img/a.png"}
    assert json.loads(first["gen_meta"])["source_meta"] == {"seed": 3}
    assert (out[1]["id"], out[1]["image"], out[1]["image_url"]) == ("jsonl:t.jsonl:2", None, "https://x/2.png")
    assert out[2]["image_url"] == "https://y/3.png"  # the URL column wins over a URL in the image column
    assert out[2]["narrative_origin"] is None and out[2]["negative_prompt"] is None
    folder = tmp_path.resolve()
    assert [(d.reason, d.detail, d.row["id"]) for d in out[3:]] == [
        ("no_prompt", "t.jsonl:4: no 'prompt'", "jsonl:k4"),
        ("bad_url", "t.jsonl:5: url 'ftp://x/5.png' is not an http(s) URL", "jsonl:k5"),
        ("no_image", "t.jsonl:6: neither an image nor an image URL", "jsonl:k6"),
        ("bad_url", "t.jsonl:7: 's3://bucket/7.png' is not an http(s) URL", "jsonl:k7"),
        ("unsafe_path", f"t.jsonl:8: '../o.png' is not a path inside {folder}", "jsonl:k8"),
        ("missing_file", "t.jsonl:9: img/none.png: No such file or directory", "jsonl:k9"),
    ]


def test_image_structs_and_bytes_in_a_table(tmp_path: Path) -> None:
    (tmp_path / "b.png").write_bytes(_png())
    table = pa.table({"prompt": ["p1", "p2", "p3", "p4"],
                      "image": [{"bytes": b"raw", "path": "x.png"}, {"bytes": None, "path": "b.png"},
                                {"bytes": b"", "path": None}, None]})
    pq.write_table(table, tmp_path / "t.parquet")
    source = ParquetConfig(path=tmp_path, image_column="image").build()
    out = [r for p in source.list_partitions() for r in source.read_partition(p)]
    assert out[0]["image"] == {"bytes": b"raw", "path": "x.png"}
    assert out[1]["image"] == {"bytes": _png(), "path": "b.png"}  # no bytes: the path is read
    assert [(d.reason, d.detail) for d in out[2:]] == [("no_image", "t.parquet:2: neither an image nor an image URL"),
                                                       ("no_image", "t.parquet:3: neither an image nor an image URL")]
    bare = tmp_path / "bare"
    bare.mkdir()
    pq.write_table(pa.table({"prompt": ["p"], "image": [b"bytes"]}), bare / "t.parquet")
    (row,) = ParquetConfig(path=bare, image_column="image").build().read_partition({"file": "t.parquet", "start": 0,
                                                                                   "stop": 1})
    assert row["image"] == {"bytes": b"bytes", "path": None}


def test_imagefolder_lines_known_answers(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png())
    lines = [
        json.dumps({"file_name": "a.png", "prompt": "a fox", "text": "  A fox. ", "negative_prompt": "dark",
                    "seed": 4}),
        "[1]", "{bad", json.dumps({"file_name": 3, "prompt": "p"}),
        json.dumps({"file_name": "../a.png", "prompt": "p"}), json.dumps({"file_name": "a.png"}),
        json.dumps({"file_name": "gone.png", "prompt": "p"}),
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    try:
        json.loads("{bad")
    except ValueError as e:
        problem = str(e)
    source = ImageFolderConfig(path=tmp_path).build()
    out = [r for p in source.list_partitions() for r in source.read_partition(p)]
    first = out[0]
    assert (first["id"], first["source_id"], first["image"], first["keyword_prompt_raw"], first["negative_prompt"],
            first["narrative_prompt"], first["narrative_origin"]) == (
        "imagefolder:a.png", "a.png", {"bytes": _png(), "path": "a.png"}, "a fox", "dark", "A fox.", "source")
    assert json.loads(first["gen_meta"])["source_meta"] == {"seed": 4}
    where = "metadata.jsonl line"
    assert [(d.reason, d.detail, d.row["id"]) for d in out[1:]] == [
        ("bad_metadata_line", f"{where} 2: not an object with a string file_name", f"imagefolder:{where} 2"),
        ("bad_metadata_line", f"{where} 3: {problem}", f"imagefolder:{where} 3"),
        ("bad_metadata_line", f"{where} 4: not an object with a string file_name", f"imagefolder:{where} 4"),
        ("unsafe_path", f"{where} 5: file_name '../a.png' is not a path inside the folder", "imagefolder:../a.png"),
        ("no_prompt", f"{where} 6: no 'prompt'", "imagefolder:a.png"),
        ("missing_file", f"{where} 7: gone.png: No such file or directory", "imagefolder:gone.png"),
    ]


def test_jsonl_meta_columns_and_odd_image_values(tmp_path: Path) -> None:
    long_url = "ftp://x/" + "a" * 300
    records = [{"prompt": "p", "url": "https://x/1.png", "seed": 1, "steps": 2},
               {"prompt": "p", "url": long_url}, {"prompt": "p", "file": long_url}, {"prompt": "p", "file": 5}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    source = JsonlConfig(path=tmp_path, image_column="file", image_url_column="url", meta_columns=["seed"]).build()
    out = [r for p in source.list_partitions() for r in source.read_partition(p)]
    assert json.loads(out[0]["gen_meta"])["source_meta"] == {"seed": 1}  # only the named column
    assert [(d.reason, d.detail) for d in out[1:]] == [  # a value is quoted up to its first 200 characters
        ("bad_url", f"t.jsonl:2: url {long_url[:200]!r} is not an http(s) URL"),
        ("bad_url", f"t.jsonl:3: {long_url[:200]!r} is not an http(s) URL"),
        ("no_image", "t.jsonl:4: neither an image nor an image URL"),
    ]


def test_json_depth_counts_containers_after_a_scalar() -> None:
    assert bounds.json_depth([[[[1]]], 1]) == 4 and bounds.json_depth({"b": [[2]], "a": 1}) == 3


def test_inflate_produces_no_more_than_the_limit_of_a_bomb() -> None:
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros in about 64 KiB
    tracemalloc.start()
    try:
        with pytest.raises(OverBound) as info:
            bounds.inflate(bomb, 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert (info.value.reason, info.value.detail) == ("metadata_too_large", "compressed text inflates past 1024 bytes")


def test_imagefolder_folders_symlinks_and_names(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder in (root / "sub", root / ".hidden", outside):
        folder.mkdir(parents=True)
        (folder / "a.png").write_bytes(_png())
        (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "p"}) + "\n")
    records = ({"file_name": "dir\\b.png", "prompt": "p"}, {"file_name": "fifo.png", "prompt": "p"}, ["x"])
    lines = [json.dumps(r) for r in records] + ["[" * 70 + "]" * 70]
    (root / "sub" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (root / "sub" / "dir").mkdir()
    (root / "sub" / "dir" / "b.png").write_bytes(_png())
    os.mkfifo(root / "sub" / "fifo.png")
    source = ImageFolderConfig(path=root).build()
    parts = source.list_partitions()
    assert [p["file"] for p in parts] == ["sub/metadata.jsonl"]  # a hidden folder is not searched
    kept, fifo, not_object, deep = source.read_partition(parts[0])
    where = "sub/metadata.jsonl line"
    assert (kept["id"], kept["source"], kept["image"]["path"]) == ("imagefolder:sub/dir/b.png", "imagefolder",
                                                                  "sub/dir/b.png")
    assert (fifo.reason, fifo.detail, fifo.row) == (
        "not_a_regular_file", f"{where} 2: sub/fifo.png: not a regular file (a FIFO, socket or device)",
        {"id": "imagefolder:sub/fifo.png", "source": "imagefolder", "source_id": "sub/fifo.png"})
    assert not_object.row == {"id": f"imagefolder:{where} 3", "source": "imagefolder"}
    assert (deep.reason, deep.row) == ("json_too_deep", {"id": f"imagefolder:{where} 4", "source": "imagefolder"})
    os.symlink(outside, root / "link")
    with pytest.raises(SourceError) as info:  # a listed metadata file is never read through a symlink
        list(source.read_partition({**parts[0], "file": "link/metadata.jsonl"}))
    assert str(info.value) == (f"imagefolder source: listed metadata file 'link/metadata.jsonl' is outside "
                               f"{root.resolve()}")
    with pytest.raises(SourceError) as info:
        ImageFolderConfig(path=root / "a.png").build().list_partitions()
    assert str(info.value) == f"imagefolder source: {root / 'a.png'} is not a folder"


def test_a_categorical_column_goes_into_gen_meta_like_a_plain_one(tmp_path: Path) -> None:
    # pandas writes a `category` column as a dictionary-encoded one: its values are plain strings all the same.
    _table(tmp_path / "t.parquet", 2, sampler=pa.array(["euler", "ddim"]).dictionary_encode(), steps=pa.array([1, 2]))
    source = ParquetConfig(path=tmp_path, image_url_column="url").build()
    rows = [r for p in source.list_partitions() for r in source.read_partition(p)]
    assert [json.loads(r["gen_meta"])["source_meta"] for r in rows] == [{"sampler": "euler", "steps": 1},
                                                                        {"sampler": "ddim", "steps": 2}]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux procfs")
def test_read_regular_stops_at_the_limit_of_a_file_larger_than_it_said() -> None:
    # procfs files say 0 bytes and then hold more: like a file that grew between fstat and read.
    assert Path("/proc/self/status").stat().st_size == 0
    with pytest.raises(OverBound) as info:
        bounds.read_regular(Path("/proc/self/status"), 10)
    assert (info.value.reason, info.value.detail) == ("file_too_large", "more than 10 bytes")


def test_gen_meta_is_text_with_sorted_keys() -> None:
    assert gen_meta_json({"b": "ü"}, model="café", steps=3) == (
        '{"model": "café", "source_meta": {"b": "ü"}, "steps": 3}')


def test_a_listed_metadata_file_is_never_read_through_a_symlink(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(_png())
    (root / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "p"}) + "\n")
    os.symlink(root / "sub", root / "alias")  # inside the root, yet a symlink
    source = ImageFolderConfig(path=root).build()
    (part,) = source.list_partitions()
    with pytest.raises(SourceError, match="listed metadata file 'alias/metadata.jsonl' is outside"):
        list(source.read_partition({**part, "file": "alias/metadata.jsonl"}))


def _depth_kept(value: object) -> int:
    """How many containers deep json_safe's copy goes before the cut-off (None)."""
    depth = 0
    while isinstance(value, list | dict):
        value = value[0] if isinstance(value, list) else value["k"]
        depth += 1
    assert value is None
    return depth


def test_json_safe_cuts_nesting_below_its_max_depth_and_bounds_ints() -> None:
    nested_list: object = "x"
    nested_dict: object = "x"
    for _ in range(40):
        nested_list, nested_dict = [nested_list], {"k": nested_dict}
    assert _depth_kept(json_safe(nested_list)) == _depth_kept(json_safe(nested_dict)) == MAX_DEPTH + 1
    assert json_safe([2**128 - 1, 2**128, -(2**128)]) == [2**128 - 1, None, None]
    assert json_safe(Path("a/b")) == "a/b" and json_safe({1}) == "{1}"


def test_as_int_reads_signed_digit_strings_exactly() -> None:
    big = 12345678901234567891  # more digits than a float holds exactly
    assert as_int(f"-{big}") == -big and as_int(f" +{big} ") == big and as_int(str(big)) == big
