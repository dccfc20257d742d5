"""Fetch's caps at their limits, one below and one above: body bytes (declared and streamed), pixels, retries."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from civitai_server import FakeCivitai, image_bytes

from surd.fetch import FetchConfig
from surd.rows import Drop

BASE = {"allowed_hosts": ["127.0.0.1"], "allow_private_hosts": True, "backoff_base": 0.01, "timeout": 2.0,
        "total_timeout": 5.0}
BODY = image_bytes(3, "png", 40)  # a 40x40 PNG


def fetch_one(url: str, **options: object) -> dict | Drop:
    [result] = FetchConfig(**{**BASE, "max_retries": 0, **options}).build().process_batch(
        [{"id": "t:0", "source": "test", "image_url": url}])
    return result


class _Chunked(BaseHTTPRequestHandler):
    """Serves BODY with Transfer-Encoding: chunked (no Content-Length): the cap is enforced while streaming."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        for start in range(0, len(BODY), 100):
            piece = BODY[start:start + 100]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def chunked_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Chunked)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/image.png"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[FakeCivitai]:
    with FakeCivitai(n_items=4) as s:
        yield s


@pytest.mark.parametrize(("cap", "kept"), [(len(BODY) - 1, False), (len(BODY), True), (len(BODY) + 1, True)])
def test_max_bytes_with_a_content_length(server: FakeCivitai, cap: int, kept: bool) -> None:
    result = fetch_one(f"{server.base}/img/ok/3.png?size=40", max_bytes=cap)
    if kept:
        assert isinstance(result, dict) and result["image"]["bytes"] == BODY
    else:
        assert isinstance(result, Drop) and result.reason == "too_large"
        assert result.detail == f"content-length {len(BODY)} > {cap} bytes"


@pytest.mark.parametrize(("cap", "kept"), [(len(BODY) - 1, False), (len(BODY), True), (len(BODY) + 1, True)])
def test_max_bytes_while_streaming(chunked_url: str, cap: int, kept: bool) -> None:
    result = fetch_one(chunked_url, max_bytes=cap)
    if kept:
        assert isinstance(result, dict) and result["image"]["bytes"] == BODY
    else:
        assert isinstance(result, Drop) and result.reason == "too_large"
        assert result.detail == f"more than {cap} bytes"


@pytest.mark.parametrize(("cap", "kept"), [(40 * 40 - 1, False), (40 * 40, True), (40 * 40 + 1, True)])
def test_max_pixels(server: FakeCivitai, cap: int, kept: bool) -> None:
    result = fetch_one(f"{server.base}/img/ok/3.png?size=40", max_pixels=cap)
    if kept:
        assert isinstance(result, dict) and (result["width"], result["height"]) == (40, 40)
    else:
        assert isinstance(result, Drop) and result.reason == "decompression_bomb"
        assert result.detail == f"40x40 exceeds {cap} pixels"


@pytest.mark.parametrize(("retries", "kept"), [(1, False), (2, True), (3, True)])
def test_max_retries_against_two_failures(retries: int, kept: bool) -> None:
    # Two 503s, then the image: two retries are exactly enough.
    with FakeCivitai(n_items=1) as server:
        fetcher = FetchConfig(**{**BASE, "max_retries": retries}).build()
        [result] = fetcher.process_batch([{"id": "t:0", "source": "test",
                                           "image_url": f"{server.base}/img/flaky/503/k?n=2"}])
        assert server.hits["flaky/503/k"] == min(retries, 2) + 1
    if kept:
        assert isinstance(result, dict) and fetcher.counters["retries"] == 2
    else:
        assert isinstance(result, Drop) and result.reason == "http_503"
        assert result.detail == "HTTP 503 (after 1 retries)" and fetcher.counters["retries"] == 1


def test_no_retries_means_one_attempt_and_a_plain_detail(server: FakeCivitai) -> None:
    result = fetch_one(f"{server.base}/img/flaky/503/once?n=1")
    assert isinstance(result, Drop) and result.detail == "HTTP 503"
    assert server.hits["flaky/503/once"] == 1
