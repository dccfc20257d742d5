"""The fetch stage against the loopback server: every fault, the host rules, limits, retries, resumption."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from civitai_server import RETRY_AFTER, FakeCivitai, image_bytes
from PIL import Image

from pipelines.retry import retry_failed
from surd import shards
from surd.fetch import TRANSIENT, FetchConfig
from surd.rows import Drop
from surd.schema import DROPPED_SCHEMA, from_rows
from surd.sources.http import host_allowed, is_public_ip, user_agent


@pytest.fixture
def server():
    with FakeCivitai(n_items=10) as s:
        yield s


def fetch(urls: list[str | None], source: str = "test", **options: object) -> list:
    base = {"allowed_hosts": ["127.0.0.1"], "allow_private_hosts": True, "backoff_base": 0.01, "max_retries": 1,
            "timeout": 1.0, "total_timeout": 2.0}
    fetcher = FetchConfig(**{**base, **options}).build()
    rows = [{"id": f"t:{i}", "source": source, "image_url": url} for i, url in enumerate(urls)]
    return fetcher.process_batch(rows)


def reason(result: object) -> str:
    assert isinstance(result, Drop), result
    return result.reason


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_ok_records_hash_size_format(server: FakeCivitai, fmt: str) -> None:
    [row] = fetch([f"{server.base}/img/ok/3.{fmt}?size=40"])
    expected = image_bytes(3, fmt, 40)
    assert row["image"]["bytes"] == expected
    assert row["sha256"] == hashlib.sha256(expected).hexdigest()
    assert (row["width"], row["height"]) == (40, 40)
    assert row["image_format"] == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt]
    assert row["image_url"].endswith(f"3.{fmt}?size=40") and row["id"] == "t:0"


def test_large_images_decode_off_the_event_loop(server: FakeCivitai) -> None:
    [row] = fetch([f"{server.base}/img/ok/5.png?size=300&noise=1"])
    expected = image_bytes(5, "png", 300, True)
    assert len(expected) > 64 * 1024  # above INLINE_DECODE_BYTES: the worker-thread path
    assert row["sha256"] == hashlib.sha256(expected).hexdigest() and row["width"] == 300


def test_rows_with_bytes_pass_through_untouched(server: FakeCivitai) -> None:
    row = {"id": "x", "image": {"bytes": b"anything", "path": None}, "image_url": f"{server.base}/img/ok/1.png"}
    fetcher = FetchConfig(allowed_hosts=["127.0.0.1"], allow_private_hosts=True).build()
    assert fetcher.process_batch([row]) == [row]
    assert server.requests == []


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/img/status/404/a", "http_404"),
        ("/img/status/403/a", "http_403"),
        ("/img/flaky/503/a", "http_503"),
        ("/img/html/a", "not_an_image"),
        ("/img/fake-jpeg/a", "not_an_image"),
        ("/img/corrupt/a", "corrupt_image"),
        ("/img/bomb/a", "decompression_bomb"),
        ("/img/huge/a", "too_large"),
        ("/img/huge-chunked/a", "too_large"),
        ("/img/redirect-loop/a", "too_many_redirects"),
        ("/img/truncated/a", "truncated"),
        ("/img/slow/a?s=5", "timeout"),
        ("/img/drip/a", "timeout"),
    ],
)
def test_faults_become_drop_reasons(server: FakeCivitai, path: str, expected: str) -> None:
    assert reason(fetch([server.base + path], max_retries=0, total_timeout=1.0)[0]) == expected


def test_bad_urls(server: FakeCivitai) -> None:
    results = fetch([None, "ftp://127.0.0.1/x.png", "file:///etc/passwd", "http:///nohost", "not a url"])
    assert [reason(r) for r in results] == ["no_image_url", "bad_url", "bad_url", "bad_url", "bad_url"]


def test_transient_failures_are_retried(server: FakeCivitai) -> None:
    results = fetch([f"{server.base}/img/flaky/503/k?n=2", f"{server.base}/img/truncated/k?n=1"], max_retries=2)
    assert all(isinstance(r, dict) for r in results)
    assert server.hits["flaky/503/k"] == 3 and server.hits["truncated/k"] == 2


def test_final_failures_are_not_retried(server: FakeCivitai) -> None:
    fetch([f"{server.base}/img/status/404/k", f"{server.base}/img/corrupt/k"], max_retries=3)
    assert server.hits["status/404/k"] == 1 and server.hits["corrupt/k"] == 1


def test_retry_after_is_honoured(server: FakeCivitai) -> None:
    start = time.monotonic()
    [row] = fetch([f"{server.base}/img/flaky/429/k?n=1"])
    assert isinstance(row, dict) and time.monotonic() - start >= RETRY_AFTER


def test_long_retry_after_gives_up_for_later(server: FakeCivitai) -> None:
    [row] = fetch([f"{server.base}/img/flaky/429/k?n=1"], retry_after_max=0.5)
    assert reason(row) == "http_429" and reason(row) in TRANSIENT
    assert server.hits["flaky/429/k"] == 1


def test_redirects_are_followed_and_rechecked(server: FakeCivitai) -> None:
    inside = f"{server.base}/img/redirect?to=/img/ok/4.png"
    outside = f"{server.base}/img/redirect?to=http://localhost:{server.port}/img/ok/5.png"
    ok, refused = fetch([inside, outside])
    assert ok["image"]["bytes"] == image_bytes(4)
    assert reason(refused) == "host_not_allowed" and "localhost" in refused.detail
    assert "ok/5.png" not in server.hits


def test_redirect_count_is_capped(server: FakeCivitai) -> None:
    assert reason(fetch([f"{server.base}/img/redirect-loop/k"], max_redirects=2)[0]) == "too_many_redirects"
    assert server.hits["redirect-loop/k"] == 3


def test_private_targets_refused_unless_allowed(server: FakeCivitai) -> None:
    urls = [f"{server.base}/img/ok/1.png", f"http://localhost:{server.port}/img/ok/2.png"]
    results = fetch(urls, allow_private_hosts=False, allowed_hosts=["127.0.0.1", "localhost"])
    assert [reason(r) for r in results] == ["private_host", "private_host"]
    assert server.requests == []  # refused before connecting


def test_default_allow_list_is_the_sources_cdn(server: FakeCivitai) -> None:
    url = f"{server.base}/img/ok/1.png"
    assert reason(fetch([url], source="civitai", allowed_hosts=None)[0]) == "host_not_allowed"
    assert reason(fetch([url], source="lexica", allowed_hosts=None)[0]) == "host_not_allowed"
    assert isinstance(fetch([url], source="jsonl", allowed_hosts=None)[0], dict)  # no default: any host


def test_host_patterns_and_addresses() -> None:
    assert host_allowed("image.civitai.com", ["*.civitai.com"])
    assert not host_allowed("civitai.com.evil.net", ["*.civitai.com"])
    assert not host_allowed("evilcivitai.com", ["*.civitai.com"])
    assert host_allowed("anything", ["*"]) and host_allowed("anything", None)
    assert not any(is_public_ip(a) for a in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1",
                                             "fe80::1", "::ffff:127.0.0.1", "0.0.0.0", "224.0.0.1"))
    assert is_public_ip("93.184.216.34") and is_public_ip("2606:2800:220:1::")


def test_resize_and_reencode(server: FakeCivitai) -> None:
    [row] = fetch([f"{server.base}/img/ok/2.png?size=200"], resize_max_side=50, image_format="WEBP")
    with Image.open(io.BytesIO(row["image"]["bytes"])) as img:
        assert (img.format, img.size) == ("WEBP", (50, 50))
    assert (row["width"], row["height"], row["image_format"]) == (50, 50, "WEBP")
    assert row["sha256"] == hashlib.sha256(row["image"]["bytes"]).hexdigest()


def test_small_images_are_not_rewritten(server: FakeCivitai) -> None:
    [row] = fetch([f"{server.base}/img/ok/2.png?size=20"], resize_max_side=50)
    assert row["image"]["bytes"] == image_bytes(2, "png", 20)


def test_concurrency_limits_and_user_agent(server: FakeCivitai) -> None:
    start = time.monotonic()
    results = fetch([f"{server.base}/img/slow/{i}?s=0.3" for i in range(8)], per_host=2, concurrency=8)
    assert all(isinstance(r, dict) for r in results)
    assert time.monotonic() - start >= 4 * 0.3  # 8 downloads, 2 at a time
    assert {h["user-agent"] for _, h in server.requests} == {user_agent()}


def test_many_images_share_connections(server: FakeCivitai) -> None:
    results = fetch([f"{server.base}/img/ok/{i}.jpg" for i in range(200)], concurrency=8, per_host=8)
    assert len({r["sha256"] for r in results}) == 200
    assert server.connections <= 8


def test_processor_pickles_and_runs_inside_an_event_loop(server: FakeCivitai) -> None:
    fetcher = pickle.loads(pickle.dumps(FetchConfig(allowed_hosts=["127.0.0.1"], allow_private_hosts=True).build()))

    async def inside() -> list:
        return fetcher.process_batch([{"id": "a", "image_url": f"{server.base}/img/ok/1.png"}])

    assert isinstance(asyncio.run(inside())[0], dict)


# --- the stage in a run folder, and --retry-failed -------------------------------------------------


def make_run(run: Path, urls: list[str]) -> None:
    rows = [{"id": f"t:{i}", "source": "test", "image_url": u} for i, u in enumerate(urls)]
    stats = {"in": len(rows), "kept": len(rows), "dropped": {}, "seconds": 0.0}
    shards.commit_shard(run / "collect", "test/part-00000", from_rows(rows), from_rows([], DROPPED_SCHEMA), stats)
    shards.write_manifest(run / "collect", "collect")


def stage_config(**options: object) -> FetchConfig:
    base = {"allowed_hosts": ["127.0.0.1"], "allow_private_hosts": True, "backoff_base": 0.01, "max_retries": 0}
    return FetchConfig(**{**base, **options})


def test_stage_writes_kept_dropped_and_stats(server: FakeCivitai, tmp_path: Path) -> None:
    from pipelines.local import run_stage

    make_run(tmp_path, [f"{server.base}/img/ok/1.png", f"{server.base}/img/status/404/a", f"{server.base}/img/html/a"])
    stats = run_stage(tmp_path, "fetch", stage_config(), progress=False)
    assert (stats["in"], stats["kept"], stats["dropped"]) == (3, 1, {"http_404": 1, "not_an_image": 1})
    kept = pq.read_table(tmp_path / "fetch" / "test" / "part-00000.parquet").to_pylist()
    assert kept[0]["image"]["bytes"] == image_bytes(1) and kept[0]["width"] == 32


def test_retry_failed_recovers_transient_rows_only(server: FakeCivitai, tmp_path: Path) -> None:
    from pipelines.local import run_stage

    urls = [f"{server.base}/img/ok/1.png", f"{server.base}/img/flaky/503/r?n=1", f"{server.base}/img/status/404/r",
            f"{server.base}/img/flaky/503/s?n=5", f"{server.base}/img/truncated/r?n=1"]
    make_run(tmp_path, urls)
    run_stage(tmp_path, "fetch", stage_config(), progress=False)
    summary = retry_failed(tmp_path, stage_config())
    assert summary == {"retried": 3, "recovered": 2, "still_failing": 1, "shards": 1}
    fetch_dir = tmp_path / "fetch"
    kept_ids = pq.read_table(fetch_dir / "test" / "part-00000.parquet").column("id").to_pylist()
    assert sorted(kept_ids) == ["t:0", "t:1", "t:4"]
    dropped = pq.read_table(fetch_dir / "dropped" / "test" / "part-00000.parquet").to_pylist()
    assert [(d["id"], d["drop_reason"]) for d in dropped] == [("t:2", "http_404"), ("t:3", "http_503")]
    assert server.hits["status/404/r"] == 1  # final failures are not retried
    stats = json.loads((fetch_dir / "_stats" / "test" / "part-00000.json").read_text())
    assert (stats["kept"], stats["dropped"]) == (3, {"http_404": 1, "http_503": 1})
    assert shards.read_manifest(fetch_dir)["rows"] == 3
    again = retry_failed(tmp_path, stage_config())
    assert again["recovered"] == 0 and again["retried"] == 1  # only t:3, still flaky
    assert pq.read_table(fetch_dir / "test" / "part-00000.parquet").num_rows == 3


def test_retry_failed_reconciles_after_a_crash_between_writes(server: FakeCivitai, tmp_path: Path) -> None:
    from pipelines.local import run_stage

    make_run(tmp_path, [f"{server.base}/img/ok/1.png", f"{server.base}/img/flaky/503/c?n=1"])
    run_stage(tmp_path, "fetch", stage_config(), progress=False)
    # what a retry killed after writing the kept shard leaves behind: the row in both files
    fetch_dir = tmp_path / "fetch"
    kept_path = fetch_dir / "test" / "part-00000.parquet"
    dropped_row = pq.read_table(fetch_dir / "dropped" / "test" / "part-00000.parquet").to_pylist()[0]
    recovered = FetchConfig(allowed_hosts=["127.0.0.1"], allow_private_hosts=True).build().process_batch(
        [{k: v for k, v in dropped_row.items() if not k.startswith("drop_")}])
    shards.write_table(kept_path, pa.concat_tables([pq.read_table(kept_path), from_rows(recovered)]))
    hits = server.hits["flaky/503/c"]
    summary = retry_failed(tmp_path, stage_config())
    assert summary["retried"] == 0 and server.hits["flaky/503/c"] == hits  # nothing downloaded again
    assert sorted(pq.read_table(kept_path).column("id").to_pylist()) == ["t:0", "t:1"]
    assert pq.read_table(fetch_dir / "dropped" / "test" / "part-00000.parquet").num_rows == 0


def test_cli_collect_fetch_and_retry_failed(tmp_path: Path) -> None:
    run = tmp_path / "run"

    def surd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "surd", *args], capture_output=True, text=True, timeout=120)

    with FakeCivitai(n_items=40) as server:
        done = surd("collect", "civitai", "--api-base", server.api_base, "--max-items", "12", "--limit", "10",
                    "--out", str(run), "-q", "--option", "requests_per_second=100")
        assert done.returncode == 0, done.stderr
        server.image_faults.extend([503, 503, 503])
        sets = ["--set", 'allowed_hosts=["127.0.0.1"]', "--set", "max_retries=0"]
        done = surd("fetch", str(run), "-q", "--allow-private-hosts", "--concurrency", "1", *sets)
        assert done.returncode == 0, done.stderr
        assert shards.stage_stats(run / "fetch")["dropped"] == {"http_503": 3}
        done = surd("fetch", str(run), "--retry-failed", "--allow-private-hosts", *sets)
        assert done.returncode == 0, done.stderr
        assert "3 recovered" in done.stdout
    ids = shards.read_stage_table(run / "fetch", columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 12


def test_surd_recipe_validates(tmp_path: Path) -> None:
    from pipelines.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "pipelines" / "recipes" / "surd.yaml", tmp_path)
    assert [s.type for s in recipe.sources()] == ["civitai", "diffusiondb", "lexica"]
    fetch_config = dict(recipe.stages())["fetch"]
    assert fetch_config.allowed_hosts is None and not fetch_config.allow_private_hosts  # safe defaults kept
