"""Local-file sources (folder, imagefolder, parquet, jsonl) and the demo data generator."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from surd.clean import CleanConfig
from surd.dedup import plan_dedup
from surd.demo import EXPECTED_KEPT, PLANTED, make_bench_images, make_demo_data, make_imagefolder_demo
from surd.errors import RecipeError, SourceError, SurdError
from surd.phash import hamming
from surd.rows import Drop
from surd.schema import from_rows
from surd.sources import source_config
from surd.sources.folder import FolderConfig
from surd.sources.imagefolder import ImageFolderConfig
from surd.sources.metadata import read_embedded
from surd.sources.tabular import JsonlConfig, ParquetConfig

PARAMS = "a heron in a misty marsh, (soft light:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 7"


def png(colour=(10, 200, 90), text: str | None = None, size=(96, 80)) -> bytes:
    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def collect(config) -> list:
    source = config.build()
    return [item for part in source.list_partitions() for item in source.read_partition(part)]


def by_source_id(items) -> dict:
    return {(i.row if isinstance(i, Drop) else i)["source_id"]: i for i in items}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out)
    return out


# ---- folder ---------------------------------------------------------------------------------------------


def test_registry_builds_every_local_source(tmp_path):
    for raw in ({"type": "folder", "path": str(tmp_path)}, {"type": "imagefolder", "path": str(tmp_path)},
                {"type": "parquet", "path": "x.parquet", "image_column": "file"},
                {"type": "jsonl", "path": "x.jsonl", "image_url_column": "url"}):
        source = source_config(raw).build()
        assert hasattr(source, "list_partitions") and source.name == raw["type"]
    with pytest.raises(RecipeError, match="image_column or image_url_column"):
        source_config({"type": "jsonl", "path": "x.jsonl"})
    with pytest.raises(RecipeError, match="bogus"):
        source_config({"type": "folder", "path": str(tmp_path), "bogus": 1})


def test_folder_rows_from_every_kind_of_metadata(demo):
    items = by_source_id(collect(FolderConfig(path=demo)))
    row = items["a1111/00000.png"]
    assert row["id"].startswith("folder:") and len(row["id"]) == len("folder:") + 24
    assert row["source"] == "folder" and row["image"]["path"] == "a1111/00000.png"
    assert row["image"]["bytes"] == (demo / "a1111/00000.png").read_bytes()
    assert row["keyword_prompt_raw"] == read_embedded(row["image"]["bytes"]).prompt
    meta_text = row["gen_meta"]
    assert meta_text == json.dumps(json.loads(meta_text), sort_keys=True, ensure_ascii=False)
    origins = Counter(json.loads(i["gen_meta"])["meta_source"] for i in items.values() if isinstance(i, dict))
    for origin in ("png:parameters", "comfyui:prompt", "comfyui:workflow", "exif:UserComment", "jpeg:comment",
                   "sidecar:txt", "sidecar:json"):
        assert origins[origin] >= 1, origin
    assert json.loads(items["exif/00003.webp"]["gen_meta"])["meta_source"] == "exif:UserComment"
    assert items["sidecars/meta_1.webp"]["negative_prompt"]  # the `negativePrompt` spelling
    drop = items["problems/no_prompt.png"]
    assert isinstance(drop, Drop) and drop.reason == "no_prompt" and drop.row["id"].startswith("folder:")
    # the truncated image has a sidecar prompt: kept here, the clean stage drops it as undecodable
    assert items["problems/truncated.png"]["keyword_prompt_raw"] == (demo / "problems/truncated.txt").read_text()
    assert not any(sid.endswith((".txt", ".json")) for sid in items)


def test_folder_listing_and_ids_are_stable_and_chunked(demo):
    a, b = FolderConfig(path=demo, rows_per_shard=7).build(), FolderConfig(path=demo, rows_per_shard=7).build()
    parts = a.list_partitions()
    assert parts == b.list_partitions() and all(len(p) == 7 for p in parts[:-1]) and 0 < len(parts[-1]) <= 7
    flat = [p for part in parts for p in part]
    assert flat == sorted(flat) and json.loads(json.dumps(parts)) == parts
    ids = [r.row["id"] if isinstance(r, Drop) else r["id"] for r in a.read_partition(parts[0])]
    assert ids == [r.row["id"] if isinstance(r, Drop) else r["id"] for r in b.read_partition(parts[0])]
    # byte-identical files at two paths are two rows with two ids
    items = by_source_id(collect(FolderConfig(path=demo)))
    copy, original = items["duplicates/copy_of_a1111_00000.png"], items["a1111/00000.png"]
    assert copy["image"]["bytes"] == original["image"]["bytes"] and copy["id"] != original["id"]


def test_folder_precedence_embedded_then_json_then_txt(tmp_path):
    (tmp_path / "both.png").write_bytes(png(text=PARAMS))
    (tmp_path / "both.json").write_text(json.dumps({"prompt": "from json sidecar"}))
    (tmp_path / "both.txt").write_text("from txt sidecar")
    (tmp_path / "sidecars.png").write_bytes(png())
    (tmp_path / "sidecars.json").write_text(json.dumps({"prompt": "from json sidecar", "negative_prompt": "ugly"}))
    (tmp_path / "sidecars.txt").write_text("from txt sidecar")
    (tmp_path / "txt_only.PNG").write_bytes(png())
    (tmp_path / "txt_only.txt").write_text(PARAMS)
    (tmp_path / "bad_json.png").write_bytes(png())
    (tmp_path / "bad_json.json").write_text("{not json")
    (tmp_path / "bad_json.txt").write_text("fallback prompt from txt")
    items = by_source_id(collect(FolderConfig(path=tmp_path)))
    assert items["both.png"]["keyword_prompt_raw"] == "a heron in a misty marsh, (soft light:1.2)"
    assert (items["sidecars.png"]["keyword_prompt_raw"], items["sidecars.png"]["negative_prompt"]) == (
        "from json sidecar", "ugly")
    txt = items["txt_only.PNG"]  # upper-case extension is still an image
    assert (txt["keyword_prompt_raw"], txt["negative_prompt"]) == (
        "a heron in a misty marsh, (soft light:1.2)", "blurry")
    assert json.loads(txt["gen_meta"])["meta_source"] == "sidecar:txt"
    assert items["bad_json.png"]["keyword_prompt_raw"] == "fallback prompt from txt"


def test_folder_undecodable_file_with_and_without_sidecar(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "garbage.txt").write_text("a prompt for a broken file")
    (tmp_path / "lonely.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPjunk")
    items = by_source_id(collect(FolderConfig(path=tmp_path)))
    assert items["garbage.jpg"]["image"]["bytes"] == b"\xff\xd8 not really a jpeg"
    assert items["lonely.webp"].reason == "no_prompt" and "lonely.webp" in items["lonely.webp"].detail


def test_folder_skips_hidden_files_and_other_extensions(tmp_path):
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.png").write_bytes(png(text=PARAMS))
    (tmp_path / "._x.png").write_bytes(b"AppleDouble junk")
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    (tmp_path / "ok.png").write_bytes(png(text=PARAMS))
    assert FolderConfig(path=tmp_path).build().list_partitions() == [["ok.png"]]
    assert FolderConfig(path=tmp_path, extensions=["gif"]).build().list_partitions() == [["x.gif"]]


def test_folder_symlinks(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(text=PARAMS))
    (root / "sub" / "real.png").write_bytes(png(text=PARAMS))
    os.symlink(outside / "secret.png", root / "escape.png")
    os.symlink(outside, root / "escape_dir")
    os.symlink(root / "sub" / "real.png", root / "inside.png")
    os.symlink(root, root / "sub" / "loop")
    assert FolderConfig(path=root).build().list_partitions() == [["sub/real.png"]]
    followed = FolderConfig(path=root, follow_symlinks=True).build()
    assert followed.list_partitions() == [["inside.png", "sub/real.png"]]
    # a tampered listing cannot make the source read outside the folder
    tampered = ["escape.png", "../outside/secret.png", "/etc/hostname"]
    items = list(FolderConfig(path=root).build().read_partition(tampered))
    assert [i.reason for i in items] == ["unsafe_path"] * 3
    assert all(i.row.get("image") is None for i in items)


def test_folder_rows_are_arrow_safe_with_odd_names_and_text(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # not UTF-8: Python hands it over with a surrogate escape
    (tmp_path / name).write_bytes(png())
    (tmp_path / os.fsdecode(b"caf\xe9.json")).write_text('{"prompt": "lone \\ud800 surrogate", "seed": NaN}')
    (row,) = collect(FolderConfig(path=tmp_path))
    prompt, source_id = row["keyword_prompt_raw"], row["source_id"]
    assert prompt.startswith("lone ") and prompt.endswith(" surrogate") and source_id.startswith("caf")
    prompt.encode("utf-8"), source_id.encode("utf-8"), row["image"]["path"].encode("utf-8")  # no lone surrogates
    assert "NaN" not in row["gen_meta"] and json.loads(row["gen_meta"])["source_meta"] == {"seed": None}
    table = from_rows([row])  # Arrow refuses lone surrogates: the row must be writable as a shard
    assert table.column("id").to_pylist() == [row["id"]]


def test_folder_missing_path_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="nope"):
        FolderConfig(path=tmp_path / "nope").build().list_partitions()


# ---- imagefolder ----------------------------------------------------------------------------------------


def test_imagefolder_demo_layout(tmp_path):
    counts = make_imagefolder_demo(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    items = collect(ImageFolderConfig(path=tmp_path, rows_per_shard=4))
    assert len(items) == counts["images"] == len(lines)
    for row, line in zip(items, lines, strict=True):
        assert row["id"] == f"imagefolder:{line['file_name']}"
        assert (row["narrative_prompt"], row["narrative_origin"], row["keyword_prompt_raw"]) == (
            line["text"], "source", line["prompt"])
        assert row["image"]["bytes"] == (tmp_path / line["file_name"]).read_bytes()


def test_imagefolder_refuses_unsafe_paths_and_reports_lines(tmp_path):
    root = tmp_path / "SURD"
    root.mkdir()
    secret = tmp_path / "secret.png"  # exists, so only the path check keeps it from being read
    secret.write_bytes(png())
    (root / "ok.png").write_bytes(png())
    os.symlink(secret, root / "link.png")
    names = ["../secret.png", str(secret), "sub/../../secret.png", "..\\secret.png", "C:\\secret.png", "link.png"]
    lines = [json.dumps({"file_name": n, "text": "t", "prompt": "a prompt long enough"}) for n in names]
    lines += ["{broken json", "", json.dumps({"file_name": "gone.png", "prompt": "p"}),
              json.dumps({"file_name": "ok.png", "text": "", "prompt": "a castle"}), json.dumps(["not", "a", "dict"])]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    items = collect(ImageFolderConfig(path=root, rows_per_shard=3))
    reasons = [i.reason if isinstance(i, Drop) else "kept" for i in items]
    assert reasons == ["unsafe_path"] * 6 + ["bad_metadata_line", "missing_file", "kept", "bad_metadata_line"]
    assert all(i.row.get("image") is None for i in items if isinstance(i, Drop))
    assert "line 7" in items[6].detail and "line 11" in items[9].detail  # 1-based, counting the blank line
    kept = items[8]
    assert kept["narrative_prompt"] is None and kept["narrative_origin"] is None


def test_imagefolder_nested_split_folders(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "a.png").write_bytes(png(colour=(1, 2, 3) if split == "train" else (9, 9, 9)))
        (tmp_path / split / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "p " + split}))
    rows = collect(ImageFolderConfig(path=tmp_path))
    assert [r["id"] for r in rows] == ["imagefolder:test/a.png", "imagefolder:train/a.png"]
    assert rows[1]["image"]["bytes"] == (tmp_path / "train/a.png").read_bytes()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no metadata.jsonl"):
        ImageFolderConfig(path=tmp_path / "empty").build().list_partitions()


# ---- parquet / jsonl ------------------------------------------------------------------------------------


def test_jsonl_paths_urls_and_drops(tmp_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "a.png").write_bytes(png())
    (tmp_path / "outside.png").write_bytes(png())
    (data / "img" / "link.png").symlink_to(tmp_path / "outside.png")
    records = [
        {"prompt": "a fox", "file": "img/a.png", "seed": 1, "blob": [1, 2]},
        {"prompt": "via symlink", "file": "img/link.png"},
        {"prompt": "a url", "url": "https://example.org/x.png"},
        {"prompt": "", "file": "img/a.png"},
        {"prompt": "no image"},
        {"prompt": "escape", "file": "../outside.png"},
        {"prompt": "local url", "url": "file:///etc/passwd"},
        {"prompt": "missing", "file": "img/none.png"},
    ]
    (data / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{bad\n")
    cfg = JsonlConfig(path=data / "rows.jsonl", image_column="file", image_url_column="url", rows_per_shard=3)
    items = collect(cfg)
    reasons = [i.reason if isinstance(i, Drop) else "kept" for i in items]
    assert reasons == ["kept", "unsafe_path", "kept", "no_prompt", "no_image", "unsafe_path", "bad_url",
                       "missing_file", "bad_json_line"]
    first, second = items[0], items[2]
    assert first["id"] == "jsonl:rows.jsonl:1" and first["image"]["bytes"] == (data / "img/a.png").read_bytes()
    assert json.loads(first["gen_meta"]) == {"seed": 1, "source_meta": {"seed": 1}}  # scalar columns only
    assert second["image"] is None and second["image_url"] == "https://example.org/x.png"
    assert "rows.jsonl:9" in items[8].detail


def test_parquet_row_groups_ids_and_image_structs(tmp_path):
    n = 11
    table = pa.table({
        "key": [f"k{i}" for i in range(n)],
        "caption": [f"prompt number {i}" if i != 4 else None for i in range(n)],
        "simple": [f"simple {i}" for i in range(n)],
        "image": [{"bytes": png(colour=(i, i, i)), "path": f"{i}.png"} for i in range(n)],
        "model": ["sd15"] * n,
    })
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=4)
    cfg = ParquetConfig(path=tmp_path, prompt_column="caption", image_column="image", id_column="key",
                        narrative_column="simple", rows_per_shard=3)
    source = cfg.build()
    parts = source.list_partitions()
    assert [(p["start"], p["stop"]) for p in parts] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    items = [i for p in parts for i in source.read_partition(p)]
    assert [i.row["id"] if isinstance(i, Drop) else i["id"] for i in items] == [f"parquet:k{i}" for i in range(n)]
    assert items[4].reason == "no_prompt"
    row = items[5]
    assert row["image"]["bytes"] == png(colour=(5, 5, 5)) and row["narrative_prompt"] == "simple 5"
    assert json.loads(row["gen_meta"]) == {"model": "sd15", "source_meta": {"model": "sd15"}}
    with pytest.raises(SourceError, match="nope"):
        ParquetConfig(path=tmp_path, prompt_column="nope", image_column="image").build().list_partitions()


# ---- demo data ------------------------------------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_is_deterministic_and_guarded(demo, tmp_path):
    again = tmp_path / "again"
    counts = make_demo_data(again)
    assert _files(again) == _files(demo)
    assert counts["files"] == len(_files(demo)) - 1  # the marker file is not counted
    make_demo_data(again)  # rewriting an earlier demo folder is allowed
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(SurdError, match="not empty"):
        make_demo_data(tmp_path / "mine")
    make_demo_data(tmp_path / "seed1", seed=1)
    assert _files(tmp_path / "seed1") != _files(demo)


def test_demo_triggers_every_drop_reason(demo):
    """Run the demo folder through the real clean and dedup logic (no executor) and count the reasons."""
    reasons: Counter[str] = Counter()
    rows = []
    for item in collect(FolderConfig(path=demo)):
        if isinstance(item, Drop):
            reasons[item.reason] += 1
        else:
            rows.append(item)
    cleaner = CleanConfig().build()
    cleaned = []
    for row in rows:
        out = cleaner.process_row(row)
        if isinstance(out, Drop):
            reasons[out.reason] += 1
        else:
            cleaned.append(out)
    drops = plan_dedup([r["id"] for r in cleaned], [r["source_id"] for r in cleaned], [r["sha256"] for r in cleaned],
                       [r["phash"] for r in cleaned], [r["keyword_prompt"] for r in cleaned], 6)
    reasons.update(reason for reason, _ in drops.values())
    assert dict(reasons) == PLANTED
    kept = [r for r in cleaned if (r["id"], r["source_id"]) not in drops]
    assert len(kept) == EXPECTED_KEPT
    # the survivors are far apart perceptually, so a slightly different phash would not merge them
    closest = min(hamming(a["phash"], b["phash"]) for i, a in enumerate(kept) for b in kept[i + 1:])
    assert closest > 12
    assert all(256 <= min(r["width"], r["height"]) and max(r["width"], r["height"]) <= 512 for r in kept)


def test_bench_images(tmp_path):
    make_bench_images(tmp_path, 25, seed=3)
    rows = collect(FolderConfig(path=tmp_path))
    assert len(rows) == 25 and all(isinstance(r, dict) for r in rows)
    assert len({r["image"]["bytes"] for r in rows}) == 25
    sizes = [Image.open(io.BytesIO(r["image"]["bytes"])).size for r in rows]
    assert all(64 <= w <= 128 and w == h for w, h in sizes)
    assert all(json.loads(r["gen_meta"])["tool"] == "a1111" for r in rows)
