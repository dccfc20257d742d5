"""What mutation testing found untested in the API sources (Civitai, Lexica, DiffusionDB): known answers for
every field a reader fills, the exact limits, and the messages and drop details a user reads."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from surd.errors import SourceError
from surd.rows import Drop
from surd.sources import source_config
from surd.sources.bounds import OverBound
from surd.sources.civitai import CivitaiConfig, parse_meta, parse_page, unwrap_meta, validate_page
from surd.sources.civitai import item_to_row as item_to_row_civitai
from surd.sources.diffusiondb import DiffusionDBSource
from surd.sources.lexica import item_to_row as item_to_row_lexica

# ---- DiffusionDB ----


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _ddb(root: Path, members: dict[str, bytes], records: list[dict] | None, part_json: object = None) -> Path:
    """A DiffusionDB copy with one part: the zip's members, plus its metadata table (None: no table)."""
    (root / "images").mkdir(parents=True)
    with zipfile.ZipFile(root / "images" / "part-000001.zip", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        if part_json is not None:
            z.writestr("part-000001.json", part_json if isinstance(part_json, str) else json.dumps(part_json))
    if records is not None:
        pq.write_table(pa.Table.from_pylist(records), root / "metadata.parquet")
    return root


def _read(root: Path, **options: object) -> list:
    source = source_config({"type": "diffusiondb", "root": str(root), "parts": [1], **options}).build()
    return list(source.read_partition(1))


def test_member_at_the_limit_is_read_whole_and_one_byte_over_is_refused(tmp_path: Path) -> None:
    data = _png()
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.png", data)
    with zipfile.ZipFile(path) as archive:
        assert DiffusionDBSource._member(archive, "a.png", len(data)) == data
        with pytest.raises(OverBound) as info:
            DiffusionDBSource._member(archive, "a.png", len(data) - 1)
    assert (info.value.reason, info.value.detail) == ("member_too_large",
                                                      f"{len(data)} bytes uncompressed (limit {len(data) - 1})")


def test_a_member_over_max_member_bytes_is_dropped_with_its_name_and_size(tmp_path: Path) -> None:
    data = _png()
    root = _ddb(tmp_path / "ddb", {"a.png": data}, [{"image_name": "a.png", "prompt": "a cat", "part_id": 1}])
    (drop,) = _read(root, max_member_bytes=len(data) - 1)
    assert isinstance(drop, Drop)
    assert (drop.reason, drop.detail) == ("member_too_large",
                                          f"a.png: {len(data)} bytes uncompressed (limit {len(data) - 1})")
    assert drop.row["id"] == "diffusiondb:a.png" and drop.row["keyword_prompt"] == "a cat"
    (row,) = _read(root, max_member_bytes=len(data))
    assert row["image"] == {"bytes": data, "path": "a.png"}


def test_a_metadata_row_known_answer(tmp_path: Path) -> None:
    record = {"image_name": "a.png", "prompt": "  a castle, highly detailed ", "part_id": 1, "seed": 42, "step": 30,
              "cfg": 7.5, "sampler": 3, "width": 6, "height": 4, "user_name": "u1", "image_nsfw": 0.25,
              "prompt_nsfw": 0.5, "timestamp": dt.datetime(2022, 8, 7, tzinfo=dt.timezone.utc)}
    root = _ddb(tmp_path / "ddb", {"a.png": _png()}, [record])
    (row,) = _read(root)
    zip_url = f"{root}/images/part-000001.zip"
    assert {k: v for k, v in row.items() if k not in ("gen_meta", "image", "sha256")} == {
        "id": "diffusiondb:a.png", "source": "diffusiondb", "source_id": "a.png", "source_url": f"{zip_url}#a.png",
        "keyword_prompt_raw": "  a castle, highly detailed ", "keyword_prompt": "  a castle, highly detailed ",
        "image_format": "PNG", "width": 6, "height": 4}
    stamp = "2022-08-07 00:00:00+00:00"
    assert json.loads(row["gen_meta"]) == {
        "model": None, "base_model": None, "sampler": "k_euler", "steps": 30, "cfg": 7.5, "seed": 42,
        "image_nsfw": 0.25, "prompt_nsfw": 0.5, "user_name": "u1", "timestamp": stamp,
        "source_meta": {**record, "timestamp": stamp}}


def test_metadata_rows_come_in_name_order_with_only_the_known_columns(tmp_path: Path) -> None:
    names = ["c.png", "a.png", "b.png"]
    records = [{"image_name": n, "prompt": f"p {n}", "part_id": 1, "private": "x"} for n in names]
    records.append({"image_name": "d.png", "prompt": "other part", "part_id": 2, "private": "x"})
    root = _ddb(tmp_path / "ddb", {n: _png() for n in names}, records)
    rows = _read(root)
    assert [r["source_id"] for r in rows] == ["a.png", "b.png", "c.png"]
    assert json.loads(rows[0]["gen_meta"])["source_meta"] == {"image_name": "a.png", "prompt": "p a.png",
                                                              "part_id": 1}


def test_rows_without_a_prompt_or_an_image_say_why(tmp_path: Path) -> None:
    records = [{"image_name": "a.png", "prompt": None, "part_id": 1},
               {"image_name": "gone.png", "prompt": "p", "part_id": 1},
               {"image_name": None, "prompt": "p", "part_id": 1}]
    root = _ddb(tmp_path / "ddb", {"a.png": _png()}, records)
    zip_url = f"{root}/images/part-000001.zip"
    drops = {d.row["id"]: (d.reason, d.detail) for d in _read(root)}
    assert drops == {"diffusiondb:a.png": ("no_prompt", "metadata has no prompt"),
                     "diffusiondb:gone.png": ("image_missing", f"gone.png is not in {zip_url}"),
                     "diffusiondb:?": ("image_missing", f"? is not in {zip_url}")}


def test_part_json_known_answer(tmp_path: Path) -> None:
    entry = {"p": "a fox", "se": 9, "st": 25, "c": 6.5, "sa": "k_heun"}
    root = _ddb(tmp_path / "ddb", {"a.png": _png()}, None, {"a.png": entry, "b.png": "not an object"})
    (row,) = _read(root, metadata=None)
    meta = json.loads(row["gen_meta"])
    assert (meta["seed"], meta["steps"], meta["cfg"], meta["sampler"]) == (9, 25, 6.5, "k_heun")
    assert meta["source_meta"] == {"image_name": "a.png", "prompt": "a fox", "seed": 9, "step": 25, "cfg": 6.5,
                                   "sampler": "k_heun", "part_id": 1}


@pytest.mark.parametrize(("part_json", "message"), [
    (None, "diffusiondb part 1: no part-000001.json in the zip and `metadata` is null"),
    ([1, 2], "diffusiondb part 1: part-000001.json is not a JSON object"),
    ("[" * 70 + "]" * 70, "diffusiondb part 1: cannot read part-000001.json: json_too_deep: part-000001.json in "
                          "part 1: JSON nested deeper than 64"),
])
def test_part_json_errors_name_the_part_and_the_file(tmp_path: Path, part_json: object, message: str) -> None:
    root = _ddb(tmp_path / "ddb", {"a.png": _png()}, None, part_json)
    with pytest.raises(SourceError) as info:
        _read(root, metadata=None)
    assert str(info.value) == message


def test_unreadable_metadata_names_its_url(tmp_path: Path) -> None:
    root = _ddb(tmp_path / "ddb", {"a.png": _png()}, None)
    with pytest.raises(SourceError, match=f"^diffusiondb: cannot read metadata {root}/metadata.parquet: "):
        _read(root)
    with pytest.raises(SourceError, match=f"^diffusiondb: cannot read metadata {root}/: "):
        _read(root, metadata="")  # an empty name is the root itself, a folder


def test_storage_options_reach_the_filesystem_for_metadata_and_zips(tmp_path: Path) -> None:
    # fsspec's `dir://` filesystem needs its folder as an option: without the options nothing can be read.
    root = _ddb(tmp_path / "ddb", {"a.png": _png()}, [{"image_name": "a.png", "prompt": "p", "part_id": 1}])
    (row,) = _read(root, metadata="dir://metadata.parquet", part_path="dir://images/part-{part:06d}.zip",
                   storage_options={"path": str(root), "target_protocol": "file"})
    assert row["source_id"] == "a.png" and row["image"]["bytes"] == _png()


def test_paths_join_the_root_once_and_absolute_ones_stand_alone(tmp_path: Path) -> None:
    root = _ddb(tmp_path / "ddbX", {"a.png": _png()}, None)  # only the slash is stripped from the root's end
    elsewhere = tmp_path / "elsewhere.parquet"
    pq.write_table(pa.Table.from_pylist([{"image_name": "a.png", "prompt": "p", "part_id": 1}]), elsewhere)
    source = source_config({"type": "diffusiondb", "root": f"{root}/", "parts": [1], "metadata": str(elsewhere)})
    assert source.build().name == "diffusiondb"
    (row,) = source.build().read_partition(1)
    assert row["source_url"] == f"{root}/images/part-000001.zip#a.png"


def test_a_corrupt_member_or_one_that_is_no_image_is_dropped_with_its_name(tmp_path: Path) -> None:
    data = _png()
    root = _ddb(tmp_path / "ddb", {"a.png": data, "b.png": b"plain text"},
                [{"image_name": n, "prompt": "p", "part_id": 1} for n in ("a.png", "b.png")])
    archive = root / "images" / "part-000001.zip"
    raw = bytearray(archive.read_bytes())
    start = 30 + len("a.png")  # a stored member's bytes follow its 30-byte local header and its name
    assert raw[start:start + len(data)] == data
    raw[start + len(data) - 1] ^= 0xFF
    archive.write_bytes(bytes(raw))
    bad, not_image = _read(root)
    assert (bad.reason, bad.detail) == ("bad_member", "a.png: Bad CRC-32 for file 'a.png'")
    assert not_image.reason == "not_an_image" and not_image.detail.startswith("b.png: cannot identify image file")
    assert bad.row["id"] == "diffusiondb:a.png" and not_image.row["id"] == "diffusiondb:b.png"


# ---- Lexica ----


def _lexica(**options: object):
    return source_config({"type": "lexica", "requests_per_second": 1000, "backoff_base": 0.01, **options}).build()


def _saved(path: Path, ids: list[object]) -> str:
    path.write_text(json.dumps({"images": [{"id": i, "prompt": f"p {i}", "src": f"https://x/{i}.png"} for i in ids]}))
    return str(path)


def test_duplicates_are_dropped_once_with_where_they_came_from(tmp_path: Path) -> None:
    first, second = _saved(tmp_path / "a.json", ["a", "b"]), _saved(tmp_path / "b.json", ["b", "c", "d", "e"])
    source = _lexica(files=[first, second], rows_per_shard=2)
    assert source.name == "lexica"
    partitions = source.list_partitions()
    # b.json: three new ids in two chunks; its duplicate is listed with its first chunk only.
    assert [(p["origin"], [i["id"] for i in p["items"]], p["duplicates"]) for p in partitions] == [
        (f"file:{first}", ["a", "b"], []), (f"file:{second}", ["c", "d"], ["b"]), (f"file:{second}", ["e"], [])]
    (*rows, drop) = source.read_partition(partitions[1])
    assert [r["id"] for r in rows] == ["lexica:c", "lexica:d"]
    assert (drop.reason, drop.detail, drop.row) == (
        "duplicate_id", f"already collected from an earlier query or file (file:{second})",
        {"id": "lexica:b", "source": "lexica", "source_id": "b"})


@pytest.mark.parametrize(("ids", "chunks"), [([], [[]]), (["a"], [["a"]]), (["a", "b"], [["a"], ["b"]])])
def test_a_file_is_cut_into_chunks_of_rows_per_shard(tmp_path: Path, ids: list[str], chunks: list) -> None:
    source = _lexica(files=[_saved(tmp_path / "a.json", ids)], rows_per_shard=1)
    assert [[i["id"] for i in p["items"]] for p in source.list_partitions()] == chunks


def test_a_malformed_item_is_dropped_under_a_stable_id() -> None:
    drop = item_to_row_lexica([1, 2])
    digest = hashlib.sha256(json.dumps([1, 2], sort_keys=True).encode()).hexdigest()[:16]
    assert (drop.reason, drop.detail, drop.row) == ("malformed_item", "item is not an object with an id",
                                                    {"id": f"lexica:malformed-{digest}", "source": "lexica"})


def test_lexica_drops_keep_the_row_and_say_why() -> None:
    no_src = item_to_row_lexica({"id": "k1", "prompt": "p", "src": "ftp://x"})
    assert (no_src.reason, no_src.detail, no_src.row["id"]) == ("no_image_url", "src 'ftp://x'", "lexica:k1")
    no_prompt = item_to_row_lexica({"id": "k2", "src": "https://x/2.png", "nsfw": "yes", "grid": 1})
    assert (no_prompt.reason, no_prompt.detail) == ("no_prompt", "item has no prompt")
    assert no_prompt.row["id"] == "lexica:k2" and no_prompt.row["image_url"] == "https://x/2.png"
    meta = json.loads(no_prompt.row["gen_meta"])
    assert meta["nsfw"] is None and meta["grid"] is None  # only booleans are taken as flags


class _Json(BaseHTTPRequestHandler):
    """Answers every GET with the server's `body` (JSON) and records the request targets."""

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        self.server.targets.append(self.path)
        body = json.dumps(self.server.body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def json_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Json)
    server.body, server.targets = None, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


def test_a_search_answer_of_the_wrong_shape_is_a_clean_error(json_server, tmp_path: Path) -> None:
    json_server.body = {"results": []}
    source = _lexica(queries=["castle"], api_base=json_server.url, max_retries=0)
    with pytest.raises(SourceError) as info:
        source.list_partitions()
    assert "malformed response (expected an object with an 'images' list) after 0 retries" in str(info.value)
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": []}')
    with pytest.raises(SourceError) as info:
        _lexica(files=[str(bad)]).list_partitions()
    assert str(info.value) == f"lexica file {bad}: expected an object with an 'images' list"


# ---- Civitai ----


def test_civitai_params_name_every_filter_and_leave_out_the_unset() -> None:
    config = CivitaiConfig(limit=50, sort="Most Reactions", period="Month", nsfw=True, browsing_level=3,
                           base_models=["SD 1.5", "Pony"], model_id=11, model_version_id=12, post_id=13,
                           username="painter")
    assert config.params() == {
        "limit": "50", "withMeta": "true", "type": "image", "sort": "Most Reactions", "period": "Month",
        "nsfw": "true", "browsingLevel": "3", "baseModels": "SD 1.5,Pony", "modelId": "11", "modelVersionId": "12",
        "postId": "13", "username": "painter"}
    assert CivitaiConfig(nsfw="Soft", sort=None).params() == {
        "limit": "200", "withMeta": "true", "type": "image", "nsfw": "Soft"}
    assert CivitaiConfig().params()["sort"] == "Newest" and CivitaiConfig(nsfw=False).params()["nsfw"] == "false"


@pytest.mark.parametrize(("page", "message"), [
    ([], "expected an object with an 'items' list"),
    ({"items": {}}, "expected an object with an 'items' list"),
    ({"items": [], "metadata": []}, "'metadata' is not an object"),
    ({"items": [], "metadata": {"nextCursor": True}}, "'metadata.nextCursor' is neither a string nor a number: True"),
    ({"items": [], "metadata": {"nextCursor": [1]}}, "'metadata.nextCursor' is neither a string nor a number: [1]"),
])
def test_civitai_page_shape_errors(page: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_page(page)
    assert str(info.value) == message


@pytest.mark.parametrize(("metadata", "cursor"), [
    (None, None), ({}, None), ({"nextCursor": None}, None), ({"nextCursor": ""}, None), ({"nextCursor": 0}, "0"),
    ({"nextCursor": 12}, "12"), ({"nextCursor": "a|b"}, "a|b")])
def test_civitai_next_cursor(metadata: object, cursor: str | None) -> None:
    page = {"items": [], "metadata": metadata}
    validate_page(page)
    assert parse_page(page) == ([], cursor)


def test_civitai_pages_carry_their_cursors_and_a_repeated_cursor_stops(json_server) -> None:
    item = {"id": 1, "url": "https://image.civitai.com/1.png", "meta": {"prompt": "p"}}
    json_server.body = {"items": [item], "metadata": {"nextCursor": "c1"}}
    config = source_config({"type": "civitai", "api_base": json_server.url + "/api/v1", "requests_per_second": 1000,
                            "max_retries": 0, "name": "mine"})
    source = config.build()
    assert source.name == "mine"
    pages = source.pages(None)
    first = next(pages)
    assert (first.next_cursor, first.info) == ("c1", {"cursor": None, "items": 1, "next_cursor": "c1"})
    assert [r["id"] for r in first.rows] == ["civitai:1"] and json.loads(first.raw) == json_server.body
    second = next(pages)  # it names the cursor it was asked for as the next one: no progress, so the crawl stops
    assert second.info == {"cursor": "c1", "items": 1, "next_cursor": "c1"}
    with pytest.raises(SourceError) as info:
        next(pages)
    assert str(info.value) == (f"{json_server.url}/api/v1/images: the API returned the same cursor 'c1' again; "
                               "stopping")
    assert json_server.targets[0].startswith("/api/v1/images?") and "cursor=c1" in json_server.targets[1]
    json_server.body = {"items": [], "metadata": {}}
    (last,) = source.pages("c7")  # the last page: no next cursor, and no further request
    assert (last.next_cursor, last.info) == (None, {"cursor": "c7", "items": 0, "next_cursor": None})
    assert "cursor=c7" in json_server.targets[-1] and len(json_server.targets) == 3


@pytest.mark.parametrize(("model", "name"), [
    ({"name": "a", "title": "b"}, "a"), ({"title": "b", "modelName": "c"}, "b"), ({"modelName": "c", "hash": "d"}, "c"),
    ({"hash": "d"}, "d"), ({"other": "e"}, None), (7, "7"), (False, None)])
def test_civitai_model_written_as_an_object_or_a_number(model: object, name: str | None) -> None:
    assert parse_meta({"prompt": "p", "Model": model}).model == name


def _wrapped(inner: object, times: int) -> object:
    for level in range(times):
        inner = {"id": level, "meta": inner}
    return inner


def test_civitai_meta_is_unwrapped_at_most_four_times() -> None:
    flat = {"prompt": "deep"}
    assert unwrap_meta(_wrapped(flat, 4)) == flat
    assert unwrap_meta(_wrapped(flat, 5)) == {"id": 0, "meta": flat}  # the bound: what is left is taken as flat
    assert parse_meta(_wrapped(flat, 5)).prompt is None
    assert unwrap_meta(_wrapped(None, 4)) == {} and parse_meta(_wrapped(None, 4)).prompt is None


def test_civitai_malformed_items_are_dropped_under_a_stable_id() -> None:
    def expected_id(item: object) -> str:
        return "civitai:malformed-" + hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest()[:16]

    cases = (([1, 2], "item is list"), ("text", "item is str"), ({"id": None, "url": "u"}, "item has no id"))
    for item, detail in cases:
        drop = item_to_row_civitai(item)
        assert (drop.reason, drop.detail, drop.row) == ("malformed_item", detail,
                                                        {"id": expected_id(item), "source": "civitai"})


def test_civitai_a_video_or_an_item_without_a_url_is_dropped_with_its_row() -> None:
    item = {"id": 5, "type": "video", "url": "https://x/5.mp4", "meta": {"prompt": "p"}}
    video = item_to_row_civitai(item)
    assert (video.reason, video.detail) == ("not_an_image", "media type 'video'")
    assert video.row["id"] == "civitai:5" and video.row["keyword_prompt"] == "p"
    no_url = item_to_row_civitai({**item, "type": "image", "url": None})
    assert (no_url.reason, no_url.detail) == ("no_image_url", "url None")
    assert no_url.row["id"] == "civitai:5" and no_url.row["keyword_prompt"] == "p"
