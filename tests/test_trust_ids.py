"""One id, one row (issue #11, finding 2), and cursor cycles end paging (finding 3).

Two rows with one id used to survive collect; the score stage's plan is keyed by id, so one row was exported with
the other's scores, or the stage died. Collect now keeps the first row of an id (source folders by name, then
shards, then rows) and drops each repeat as `duplicate_id`. A cursor-paged source that cycles (A -> B -> C -> A)
or repeats earlier items used to page until `--max-items`, or forever; it now stops with a warning and keeps what
it collected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from civitai_server import FakeCivitai, civitai_item, has_prompt
from PIL import Image

from pipelines.collect import collect
from pipelines.local import run_stage
from pipelines.registry import stage_config
from surd import shards
from surd.sources import source_config


def _png(path: Path, colour: tuple[int, int, int], side: int = 80) -> str:
    Image.new("RGB", (side, side), colour).save(path)
    return path.name


def _kept(run: Path, stage: str = "collect") -> list[dict]:
    return shards.read_stage_table(run / stage).drop_columns(["image"]).to_pylist()


def _dropped(run: Path, stage: str = "collect") -> list[dict]:
    return [r for b in shards.read_dropped(run / stage) for r in b.to_pylist()]


def _table_files(folder: Path) -> list[dict]:
    folder.mkdir(parents=True)
    records = [
        {"key": "a", "prompt": "a red fox standing in deep snow, winter", "narrative": "A red fox stands in snow.",
         "image": _png(folder / "0.png", (200, 30, 30))},
        {"key": "b", "prompt": "a lighthouse on a cliff at dusk, waves", "image": _png(folder / "1.png", (9, 30, 200))},
        {"key": "c", "prompt": "a bowl of lemons on a kitchen table", "image": _png(folder / "2.png", (220, 220, 40))},
        # the id of the first row again, with another prompt and image and no narrative
        {"key": "a", "prompt": "a blue bird on a branch in spring rain", "image": _png(folder / "3.png", (30, 200, 9))},
    ]
    return records


def _collect(run: Path, **entry: object) -> None:
    collect(run, source_config(entry), progress=False)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_repeated_id_in_a_table_is_dropped_in_collect(kind: str, tmp_path: Path) -> None:
    records = _table_files(tmp_path / "src")
    path = tmp_path / "src" / f"rows.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    run = tmp_path / "run"
    # two rows a shard: the repeat lands in another shard than the row it repeats
    _collect(run, type=kind, path=str(path), id_column="key", image_column="image", narrative_column="narrative",
             rows_per_shard=2)
    kept = _kept(run)
    assert sorted(r["id"] for r in kept) == [f"{kind}:a", f"{kind}:b", f"{kind}:c"]
    first = next(r for r in kept if r["id"] == f"{kind}:a")
    assert first["keyword_prompt_raw"].startswith("a red fox")  # the first row wins
    (repeat,) = [r for r in _dropped(run) if r["drop_reason"] == "duplicate_id"]
    assert repeat["keyword_prompt_raw"].startswith("a blue bird")
    assert f"collect/{kind}/part-00000" in repeat["drop_detail"]
    stats = shards.stage_stats(run / "collect")
    assert stats["in"] == 4 and stats["kept"] == 3 and stats["dropped"] == {"duplicate_id": 1}


def test_an_imagefolder_listing_one_file_twice_gives_one_row(tmp_path: Path) -> None:
    folder = tmp_path / "train"
    folder.mkdir()
    name = _png(folder / "x.png", (10, 120, 200))
    _png(folder / "y.png", (200, 120, 10))
    lines = [{"file_name": name, "prompt": "a blue square, first listing"},
             {"file_name": "y.png", "prompt": "an orange square"},
             {"file_name": name, "prompt": "the same file listed again with another prompt"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = tmp_path / "run"
    _collect(run, type="imagefolder", path=str(folder))
    kept = _kept(run)
    assert sorted(r["id"] for r in kept) == ["imagefolder:x.png", "imagefolder:y.png"]
    assert next(r for r in kept if r["id"] == "imagefolder:x.png")["keyword_prompt_raw"].endswith("first listing")
    assert [r["drop_reason"] for r in _dropped(run)] == ["duplicate_id"]


def test_the_same_id_from_two_sources_is_kept_once_by_folder_name(tmp_path: Path) -> None:
    records = _table_files(tmp_path / "src")[:2]
    (tmp_path / "src" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "run"
    for name in ("zeta", "alpha"):  # collected in this order; the folder named first in sort order wins
        _collect(run, type="jsonl", name=name, path=str(tmp_path / "src" / "rows.jsonl"), id_column="key",
                 image_column="image")
    assert len(_kept(run)) == 2
    assert {r["source_id"] for r in _dropped(run)} == {"a", "b"}
    assert all(Path(r["drop_detail"].rsplit(" ", 1)[-1]).parts[1] == "alpha" for r in _dropped(run))
    assert sum(json.loads(p.read_text())["kept"] for p in (run / "collect" / "_stats" / "zeta").rglob("*.json")) == 0


def test_an_api_item_repeated_on_a_later_page_is_one_row(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with FakeCivitai(n_items=50) as server:
        assert has_prompt(1)
        server.also_list[20] = [1]  # page two lists item 1 again
        _collect(run, type="civitai", api_base=server.api_base, limit=20, requests_per_second=1000)
    ids = [r["id"] for r in _kept(run)]
    one = f"civitai:{civitai_item(1, '')['id']}"
    assert len(ids) == len(set(ids)) and one in ids
    repeats = [r for r in _dropped(run) if r["drop_reason"] == "duplicate_id"]
    assert [r["id"] for r in repeats] == [one]


def test_an_interrupted_duplicate_rewrite_is_finished_without_loss(tmp_path: Path) -> None:
    from pipelines.collect import drop_repeated_ids

    records = _table_files(tmp_path / "src")
    (tmp_path / "src" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "run"
    _collect(run, type="jsonl", path=str(tmp_path / "src" / "rows.jsonl"), id_column="key", image_column="image",
             rows_per_shard=2)
    expected = (_kept(run), _dropped(run), shards.stage_stats(run / "collect"))
    # a rewrite killed after writing the dropped rows and before the kept rows: the repeat is in both files
    rel = "jsonl/part-00001"
    kept = shards.read_table(shards.shard_path(run / "collect", rel))
    dropped = shards.read_table(shards.dropped_path(run / "collect", rel))
    stats = json.loads(shards.stats_path(run / "collect", rel).read_text())
    original = json.loads(json.dumps(stats))
    original["kept"] += 1
    original["dropped"] = {}
    from surd.schema import DROPPED_SCHEMA, SCHEMA

    back = pa.Table.from_pylist([{k: v for k, v in r.items() if k in SCHEMA.names} for r in dropped.to_pylist()],
                                schema=SCHEMA)
    shards.write_table(shards.shard_path(run / "collect", rel), pa.concat_tables([kept.cast(SCHEMA), back]))
    shards.atomic_write_json(shards.stats_path(run / "collect", rel), original)
    assert dropped.cast(DROPPED_SCHEMA).num_rows == 1
    assert drop_repeated_ids(run / "collect") == 1
    assert (_kept(run), _dropped(run), shards.stage_stats(run / "collect")) == expected


def test_score_keyed_by_id_gets_each_row_its_own_scores(tmp_path: Path) -> None:
    """The reported failure: with two rows of one id, score's plan gave one row the other's scores (or crashed)."""
    from surd.demo.tiny import write_tiny_clip
    from surd.score import ScoreConfig

    records = _table_files(tmp_path / "src")
    (tmp_path / "src" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "run"
    _collect(run, type="jsonl", path=str(tmp_path / "src" / "rows.jsonl"), id_column="key", image_column="image",
             narrative_column="narrative", rows_per_shard=2)
    clip = write_tiny_clip(tmp_path / "clip")
    run_stage(run, "clean", stage_config("clean", {}), progress=False)
    config = ScoreConfig(model=str(clip), pretrained=None, num_workers=0, device="cpu",
                         min_narrative_percentile=1)
    run_stage(run, "score", config, progress=False)
    rows = shards.read_stage_table(run / "score").to_pylist() + [
        r for r in _dropped(run, "score") if r["drop_reason"] == "narrative_below_percentile"]
    assert sorted(r["id"] for r in rows) == ["jsonl:a", "jsonl:b", "jsonl:c"]
    alone = ScoreConfig(model=str(clip), pretrained=None, num_workers=0, device="cpu").build()
    for row in rows:
        own = alone.process_batch([{k: v for k, v in row.items() if not k.startswith("drop_")}])[0]
        own = own.row if hasattr(own, "row") and own.row is not None else own
        assert np.isclose(row["clip_keyword"], own["clip_keyword"], atol=1e-5), row["id"]


# ---------------------------------------------------------------- cursor cycles


def _crawl(tmp_path: Path, server: FakeCivitai, **extra: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "surd", "collect", "civitai", "--out", str(tmp_path / "run"), "--api-base",
           server.api_base, "--limit", "20", "--option", "requests_per_second=1000", "-q"]
    cmd += [str(v) for pair in extra.items() for v in pair]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ})


def test_a_cursor_cycle_ends_paging_with_a_warning(tmp_path: Path) -> None:
    with FakeCivitai(n_items=200) as server:
        # None -> A(20) -> B(40) -> C(60) -> A again
        server.next_cursor = {0: "20|a", 20: "40|b", 40: "60|c", 60: "20|a"}
        result = _crawl(tmp_path, server)
        requests = len(server.api_requests())
    assert result.returncode == 0, result.stderr
    assert "returned cursor '20|a' again (a cycle)" in result.stderr
    assert requests == 4
    state = json.loads((tmp_path / "run" / "collect" / "civitai" / "_cursor.json").read_text())
    assert state["finished"] is True and state["pages"] == 4
    ids = [r["id"] for r in _kept(tmp_path / "run")]
    assert len(ids) == len(set(ids)) == sum(has_prompt(i) for i in range(80))


def test_a_page_repeating_earlier_items_ends_paging(tmp_path: Path) -> None:
    with FakeCivitai(n_items=200) as server:
        server.next_cursor = {40: "20|again"}  # a new cursor string that serves page two again, and so on forever
        result = _crawl(tmp_path, server)
        requests = len(server.api_requests())
    assert result.returncode == 0, result.stderr
    assert "held only rows collected before" in result.stderr
    assert requests == 4
    ids = [r["id"] for r in _kept(tmp_path / "run")]
    assert len(ids) == len(set(ids)) == sum(has_prompt(i) for i in range(60))
    assert shards.stage_stats(tmp_path / "run" / "collect")["dropped"]["duplicate_id"] == sum(
        has_prompt(i) for i in range(20, 40))
