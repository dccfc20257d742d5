"""Civitai source: documented response shapes, meta parsing, politeness, paging, resumption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from civitai_server import RETRY_AFTER, FakeCivitai, has_prompt
from hypothesis import given, settings
from hypothesis import strategies as st

from surd.errors import SourceError, SurdError
from surd.rows import Drop
from surd.schema import DROPPED_SCHEMA, SCHEMA, from_rows
from surd.sources import source_config
from surd.sources.civitai import CivitaiConfig, item_to_row, parse_meta, parse_page, validate_page
from surd.sources.http import RetryPolicy, parse_retry_after, user_agent

FIXTURES = Path(__file__).parent / "fixtures" / "civitai"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def make_config(server: FakeCivitai, **options: object) -> CivitaiConfig:
    base = {"type": "civitai", "api_base": server.api_base, "limit": 20, "requests_per_second": 1000,
            "backoff_base": 0.01, "max_retries": 3}
    return source_config({**base, **options})


def crawl(config: CivitaiConfig) -> list:
    rows = []
    for page in config.build().pages(None):
        rows.extend(page.rows)
    return rows


@pytest.fixture
def server():
    with FakeCivitai(n_items=95) as s:
        yield s


# --- the documented shapes (recorded fixtures) ------------------------------------------------------


def test_contract_flat_meta_page() -> None:
    data = fixture("images-page.json")
    validate_page(data)
    rows, cursor = parse_page(data)
    assert cursor == "75363|932023|257749"
    first, second = rows
    assert first["id"] == "civitai:469632"
    assert first["keyword_prompt_raw"].startswith("<lora:setsunaTokage_v10:0.6>, green hair")
    assert first["negative_prompt"] == "(worst quality, low quality, extra digits:1.3), easynegative,"
    assert first["image_url"].startswith("https://imagecache.civitai.com/")
    meta = json.loads(first["gen_meta"])
    assert (meta["seed"], meta["steps"], meta["cfg"], meta["sampler"], meta["model"]) == (
        234871805, 35, 7.0, "DPM++ SDE Karras", "Meina")
    assert meta["source_meta"]["Hires upscaler"] == "4x-AnimeSharp"  # the whole meta is kept
    second_meta = json.loads(second["gen_meta"])
    assert second_meta["base_model"] == "SDXL" and second_meta["nsfw_level"] == "Soft"
    assert second["source_url"] == "https://civitai.com/images/9173928"


def test_contract_nested_and_null_meta_numeric_cursor() -> None:
    data = fixture("images-nested-meta.json")
    validate_page(data)
    rows, cursor = parse_page(data)
    assert cursor == "101"
    nested, null_meta = rows
    assert nested["keyword_prompt_raw"] == "score_9, 1girl, watercolor, cherry blossoms, river"
    meta = json.loads(nested["gen_meta"])
    assert (meta["seed"], meta["steps"], meta["cfg"], meta["model"], meta["base_model"]) == (
        1789954213, 25, 6.5, "ponyDiffusionV6XL", "Pony")
    assert isinstance(null_meta, Drop) and null_meta.reason == "no_prompt"
    assert null_meta.row["id"] == "civitai:12221825"


def test_contract_last_page_and_videos() -> None:
    rows, cursor = parse_page(fixture("images-last-page.json"))
    assert cursor is None
    assert isinstance(rows[0], Drop) and rows[0].reason == "not_an_image"


def test_rows_fit_the_schema() -> None:
    rows = [r for name in ("images-page.json", "images-nested-meta.json") for r in parse_page(fixture(name))[0]]
    kept = [r for r in rows if not isinstance(r, Drop)]
    dropped = [{**r.row, "drop_stage": "collect", "drop_reason": r.reason} for r in rows if isinstance(r, Drop)]
    assert from_rows(kept, SCHEMA).num_rows == 3
    assert from_rows(dropped, DROPPED_SCHEMA).num_rows == 1


# --- meta parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "prompt"),
    [
        (None, None),
        ({"prompt": "a cat"}, "a cat"),
        ({"id": 1, "meta": {"prompt": "a dog"}}, "a dog"),
        ({"id": 1, "meta": {"id": 1, "meta": {"prompt": "deep"}}}, "deep"),
        ({"id": 1, "meta": None}, None),
        ({"prompt": 42}, None),
        ({"prompt": "   "}, None),
        ("a string", None),
    ],
)
def test_meta_shapes(meta: object, prompt: str | None) -> None:
    assert parse_meta(meta).prompt == prompt


def test_meta_mixed_types() -> None:
    meta = parse_meta({"prompt": "p", "seed": "12", "steps": 30.0, "cfgScale": "NaN", "Model": {"name": "m"},
                       "sampler": ["x"], "negativePrompt": "\ud800bad"})
    assert (meta.seed, meta.steps, meta.cfg, meta.model, meta.sampler) == (12, 30, None, "m", None)
    assert meta.negative_prompt == "?bad"  # a lone surrogate cannot be stored as UTF-8


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=25,
)
meta_like = st.fixed_dictionaries(
    {}, optional={k: json_values for k in ("prompt", "negativePrompt", "seed", "steps", "cfgScale", "sampler",
                                            "Model", "baseModel", "meta", "id")}
)


@settings(max_examples=150, deadline=None)
@given(meta=st.one_of(json_values, meta_like, st.builds(lambda m: {"id": 1, "meta": m}, meta_like)))
def test_meta_parser_never_raises(meta: object) -> None:
    parsed = parse_meta(meta)
    assert parsed.prompt is None or parsed.prompt.strip()
    row = item_to_row({"id": 7, "url": "https://image.civitai.com/x.png", "meta": meta})
    record = row.row if isinstance(row, Drop) else row
    json.loads(record["gen_meta"])
    from_rows([record], SCHEMA)  # storable: valid UTF-8, JSON without NaN


@settings(max_examples=200, deadline=None)
@given(item=json_values)
def test_item_parser_never_raises(item: object) -> None:
    result = item_to_row(item)
    record = result.row if isinstance(result, Drop) else result
    assert record["id"].startswith("civitai:")


# --- politeness ------------------------------------------------------------------------------------


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_backoff_grows_is_bounded_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_retries=3, backoff_base=1.0, backoff_max=3.0, retry_after_max=60)
    for _ in range(20):
        assert 0.5 <= policy.delay(0) <= 1.0 and 1.0 <= policy.delay(1) <= 2.0 and 1.5 <= policy.delay(2) <= 3.0
        assert 10 <= policy.delay(0, retry_after=10) <= 11
    assert policy.delay(3) is None  # bounded
    assert policy.delay(0, retry_after=120) is None  # longer than we hold a request: give up, retry later


def test_request_shape_user_agent_and_key(server: FakeCivitai, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIVITAI_API_KEY", "sekrit-key")
    monkeypatch.setenv("CIVITAI_API_KEY_HOST", server.api_base.split("/")[2])  # the key is for this server
    config = make_config(server, sort="Newest", base_models=["SD 1.5", "SDXL 1.0"], period="Week", nsfw=False)
    rows = crawl(config)
    requests = server.api_requests()
    assert len(requests) == 5  # 95 items, 20 per page
    target, headers = requests[1]
    for expected in ("limit=20", "withMeta=true", "type=image", "sort=Newest", "period=Week", "nsfw=false",
                     "baseModels=SD+1.5%2CSDXL+1.0", "cursor=20"):
        assert expected in target
    assert "cursor" not in requests[0][0]
    assert headers["user-agent"] == user_agent() and user_agent().startswith("surd/")
    assert headers["authorization"] == "Bearer sekrit-key"
    assert "sekrit" not in repr(config.build()) and "sekrit" not in repr(config)
    assert len(rows) == 95


def test_no_key_no_authorization_header(server: FakeCivitai, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIVITAI_API_KEY", raising=False)
    crawl(make_config(server, limit=200))
    assert "authorization" not in server.api_requests()[0][1]


def test_a_key_goes_only_to_its_own_host(server: FakeCivitai, monkeypatch: pytest.MonkeyPatch) -> None:
    # CIVITAI_API_KEY is for civitai.com: a recipe's api_base (a mirror, a typo, someone else's server) gets no key.
    monkeypatch.setenv("CIVITAI_API_KEY", "sekrit-key")
    monkeypatch.delenv("CIVITAI_API_KEY_HOST", raising=False)
    crawl(make_config(server, limit=200))
    assert all("authorization" not in headers for _, headers in server.api_requests())
    monkeypatch.setenv("CIVITAI_API_KEY_HOST", "civitai.com")
    crawl(make_config(server, limit=200))
    assert all("authorization" not in headers for _, headers in server.api_requests())


def test_a_refusal_says_why_the_key_was_not_sent_and_never_echoes_it(
    server: FakeCivitai, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CIVITAI_API_KEY", "sekrit-key")
    monkeypatch.delenv("CIVITAI_API_KEY_HOST", raising=False)
    server.api_faults.append("400")
    with pytest.raises(SourceError, match=r"CIVITAI_API_KEY is for civitai.com, so it was not sent") as error:
        crawl(make_config(server))
    assert "sekrit" not in str(error.value)


def test_a_bound_key_never_travels_over_plain_http_off_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIVITAI_API_KEY", "sekrit-key")
    monkeypatch.setenv("CIVITAI_API_KEY_HOST", "civitai.example")
    config = source_config({"type": "civitai", "api_base": "http://civitai.example/api/v1", "limit": 20})
    with pytest.raises(SurdError, match="plain http"):
        config.client(config.endpoint("images"))  # refused before any connection is made


def test_429_waits_for_retry_after(server: FakeCivitai) -> None:
    server.api_faults.extend(["429"])
    start = time.monotonic()
    rows = crawl(make_config(server, limit=200))
    assert time.monotonic() - start >= RETRY_AFTER
    assert len(server.api_requests()) == 2 and len(rows) == 95


def test_5xx_retried_then_success(server: FakeCivitai) -> None:
    server.api_faults.extend(["503", "500"])
    assert len(crawl(make_config(server, limit=200))) == 95
    assert len(server.api_requests()) == 3


def test_other_4xx_not_retried(server: FakeCivitai, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIVITAI_API_KEY", "sekrit-key")
    server.api_faults.append("400")
    with pytest.raises(SourceError, match="HTTP 400") as error:
        crawl(make_config(server))
    assert len(server.api_requests()) == 1
    assert "sekrit" not in str(error.value)


def test_retries_are_bounded(server: FakeCivitai) -> None:
    server.api_faults.extend(["503"] * 10)
    with pytest.raises(SourceError, match="after 2 retries"):
        crawl(make_config(server, max_retries=2))
    assert len(server.api_requests()) == 3


# --- paging and malformed pages ------------------------------------------------------------------


def test_full_crawl_rows_and_drops(server: FakeCivitai) -> None:
    rows = crawl(make_config(server))
    kept = [r for r in rows if not isinstance(r, Drop)]
    assert [r["id"] for r in kept] == [f"civitai:{5000 + i}" for i in range(95) if has_prompt(i)]
    assert {r.reason for r in rows if isinstance(r, Drop)} == {"no_prompt"}


def test_numeric_cursor_server() -> None:
    with FakeCivitai(n_items=45, numeric_cursor=True) as s:
        assert len(crawl(make_config(s))) == 45


def test_malformed_pages_are_retried(server: FakeCivitai) -> None:
    server.api_faults.extend(["malformed", "html", "bad_shape"])
    rows = crawl(make_config(server))
    assert [r["id"] for r in rows if not isinstance(r, Drop)] == [
        f"civitai:{5000 + i}" for i in range(95) if has_prompt(i)]


def test_junk_items_are_dropped_not_fatal(server: FakeCivitai) -> None:
    server.api_faults.append("junk_items")
    rows = crawl(make_config(server))
    junk = [r for r in rows if isinstance(r, Drop) and r.reason in ("malformed_item", "no_image_url")]
    assert len(junk) == 4
    assert len([r for r in rows if not isinstance(r, Drop)]) == sum(has_prompt(i) for i in range(95))


# --- through the collect runner: resumption and caps ------------------------------------------------


def collected_ids(run: Path) -> list[str]:
    paths = sorted((run / "collect" / "civitai").glob("part-*.parquet"))
    return [i for p in paths for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]


def test_collect_keeps_raw_pages_and_cursor(server: FakeCivitai, tmp_path: Path) -> None:
    from pipelines.collect import collect

    collect(tmp_path, make_config(server), progress=False)
    folder = tmp_path / "collect" / "civitai"
    assert len(list((folder / "_raw").glob("page-*.json.gz"))) == 5
    assert json.loads((folder / "_cursor.json").read_text())["finished"] is True
    assert len(collected_ids(tmp_path)) == sum(has_prompt(i) for i in range(95))


def test_max_items_caps_a_run(server: FakeCivitai, tmp_path: Path) -> None:
    from pipelines.collect import collect

    collect(tmp_path, make_config(server, max_items=30), progress=False)
    ids = collected_ids(tmp_path)
    assert len(ids) == 30 and len(set(ids)) == 30


def test_malformed_page_stops_cleanly_and_resumes(server: FakeCivitai, tmp_path: Path) -> None:
    from pipelines.collect import collect

    server.api_faults.extend(["ok"] * 2 + ["malformed"] * 4)  # page 3 stays broken past max_retries=3
    with pytest.raises(SourceError, match="malformed"):
        collect(tmp_path, make_config(server), progress=False)
    assert json.loads((tmp_path / "collect" / "civitai" / "_cursor.json").read_text())["pages"] == 2
    collect(tmp_path, make_config(server), progress=False)
    assert collected_ids(tmp_path) == [f"civitai:{5000 + i}" for i in range(95) if has_prompt(i)]


KILL_SCRIPT = """
import sys
from pathlib import Path
from pipelines.collect import collect
from surd.sources.civitai import CivitaiConfig
collect(Path(sys.argv[1]), CivitaiConfig(api_base=sys.argv[2], limit=10, requests_per_second=8), progress=False)
"""


def test_killed_scrape_resumes_without_gaps_or_duplicates(tmp_path: Path) -> None:
    from pipelines.collect import collect

    with FakeCivitai(n_items=120) as server:
        config = CivitaiConfig(api_base=server.api_base, limit=10, requests_per_second=8)  # as in KILL_SCRIPT
        collect(tmp_path / "whole", config, progress=False)
        run = tmp_path / "killed"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(run), server.api_base], env=env)
        cursor = run / "collect" / "civitai" / "_cursor.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if cursor.exists() and json.loads(cursor.read_text())["pages"] >= 3:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        pages_before = json.loads(cursor.read_text())["pages"]
        assert 3 <= pages_before < 12  # it really was stopped midway
        collect(run, config, progress=False)
    whole, resumed = collected_ids(tmp_path / "whole"), collected_ids(run)
    assert resumed == whole
    assert len(set(resumed)) == len(resumed) == sum(has_prompt(i) for i in range(120))
