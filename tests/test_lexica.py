"""Lexica source: live search endpoint (loopback), saved JSON files, de-duplication across both."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from civitai_server import FakeCivitai, lexica_results
from hypothesis import given, settings
from hypothesis import strategies as st

from surd.errors import RecipeError, SourceError
from surd.rows import Drop
from surd.schema import SCHEMA, from_rows
from surd.sources import source_config
from surd.sources.lexica import item_to_row

QUERIES = ["castle", "sea", "forest", "castle"]


@pytest.fixture
def server():
    with FakeCivitai() as s:
        yield s


def config(**options: object):
    return source_config({"type": "lexica", "requests_per_second": 1000, "backoff_base": 0.01, **options})


def read_all(source) -> list:
    return [r for p in source.list_partitions() for r in source.read_partition(p)]


def test_live_queries_dedupe_by_id(server: FakeCivitai) -> None:
    source = config(queries=QUERIES, api_base=server.api_base).build()
    results = read_all(source)
    all_ids = [item["id"] for q in QUERIES for item in lexica_results(q, server.base)]
    unique = list(dict.fromkeys(all_ids))
    kept = [r for r in results if not isinstance(r, Drop)]
    assert [r["source_id"] for r in kept] == unique
    duplicates = [r for r in results if isinstance(r, Drop)]
    assert {d.reason for d in duplicates} == {"duplicate_id"}
    assert len(duplicates) == len(all_ids) - len(unique) > 0
    requests = [t for t, _ in server.requests]
    assert requests == [f"/api/v1/search?q={q}" for q in QUERIES]


def test_item_fields(server: FakeCivitai) -> None:
    item = lexica_results("sea", server.base)[0]
    row = item_to_row(item)
    assert row["id"] == f"lexica:{item['id']}" and row["image_url"] == item["src"]
    assert row["keyword_prompt_raw"] == item["prompt"] and row["source_url"] == item["gallery"]
    meta = json.loads(row["gen_meta"])
    assert meta["seed"] == int(item["seed"]) and meta["cfg"] == float(item["guidance"])
    assert meta["model"] == "lexica-aperture-v2" and meta["source_meta"]["promptid"] == item["promptid"]


def test_bad_items_are_dropped() -> None:
    assert item_to_row("junk").reason == "malformed_item"
    assert item_to_row({"id": "a", "src": "https://image.lexica.art/full/a"}).reason == "no_prompt"
    assert item_to_row({"id": "a", "prompt": "p", "src": None}).reason == "no_image_url"
    assert item_to_row({"id": 5, "prompt": "p", "src": "https://x/y", "seed": "NaN"})["id"] == "lexica:5"


def test_saved_files_and_queries_together(server: FakeCivitai, tmp_path: Path) -> None:
    saved = lexica_results("forest", server.base) + [{"id": "only-in-file", "prompt": "p", "src": "https://a/b"}]
    (tmp_path / "a.json").write_text(json.dumps({"images": saved}))
    (tmp_path / "b.json").write_text(json.dumps(saved[:3]))  # a bare list is accepted too
    source = config(queries=["sea"], files=[str(tmp_path / "a.json"), f"file://{tmp_path / 'b.json'}"],
                    api_base=server.api_base).build()
    kept = [r["source_id"] for r in read_all(source) if not isinstance(r, Drop)]
    expected = list(dict.fromkeys([i["id"] for i in lexica_results("sea", server.base)] + [i["id"] for i in saved]))
    assert kept == expected


def test_errors_name_the_file_or_key(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="queries"):
        config()
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": 3}')
    with pytest.raises(SourceError, match="bad.json"):
        config(files=[str(bad)]).build().list_partitions()
    with pytest.raises(SourceError, match="missing.json"):
        config(files=[str(tmp_path / "missing.json")]).build().list_partitions()


def test_collect_persists_listing_and_does_not_refetch(server: FakeCivitai, tmp_path: Path) -> None:
    from pipelines.collect import collect

    cfg = config(queries=QUERIES, api_base=server.api_base, rows_per_shard=7)
    stats = collect(tmp_path, cfg, progress=False)
    unique = {item["id"] for q in QUERIES for item in lexica_results(q, server.base)}
    assert stats["kept"] == len(unique) and stats["dropped"] == {"duplicate_id": stats["in"] - len(unique)}
    ids = [i for p in sorted((tmp_path / "collect" / "lexica").glob("part-*.parquet"))
           for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == len(unique)
    before = len(server.requests)
    collect(tmp_path, cfg, progress=False)
    assert len(server.requests) == before  # the persisted listing is the record; nothing is fetched again


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
items = st.fixed_dictionaries({}, optional={k: json_values for k in (
    "id", "prompt", "src", "gallery", "seed", "guidance", "model", "width", "height", "nsfw", "grid")})


@settings(max_examples=100, deadline=None)
@given(item=st.one_of(json_values, items))
def test_item_parser_never_raises(item: object) -> None:
    result = item_to_row(item)
    record = result.row if isinstance(result, Drop) else result
    from_rows([record], SCHEMA)
    json.loads(record.get("gen_meta") or "{}")
