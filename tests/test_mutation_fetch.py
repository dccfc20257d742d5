"""What mutation testing found untested in fetch: decode_image's limits, problems, shrinking and re-encoding."""

from __future__ import annotations

import asyncio
import hashlib
import io
import pickle
import socket
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from civitai_server import FakeCivitai, image_bytes
from PIL import Image
from test_clean import _huge_png_header as _png_header  # a PNG declaring a size it does not hold

from surd.fetch import CheckedResolver, FetchConfig, PrivateAddressError
from surd.fetch_image import DecodedImage, ImageProblem, _rewrite, decode_image
from surd.rows import Drop
from surd.sources.http import RetryPolicy


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    img = Image.new("RGB", (width, height))
    img.putdata([((x * 7) % 256, (y * 5) % 256, (x * y) % 256) for y in range(height) for x in range(width)])
    return img.convert(mode)


def _decoded(result: DecodedImage | ImageProblem) -> Image.Image:
    assert isinstance(result, DecodedImage), result
    assert result.sha256 == hashlib.sha256(result.data).hexdigest()
    img = Image.open(io.BytesIO(result.data))
    assert (img.format, img.width, img.height) == (result.image_format, result.width, result.height)
    return img


def test_pixel_limit_at_below_and_above() -> None:
    data = _encode(_gradient(40, 30))
    kept = decode_image(data, max_pixels=1200)  # exactly 40 x 30
    assert kept == DecodedImage(data, "PNG", 40, 30, hashlib.sha256(data).hexdigest())
    assert decode_image(data, max_pixels=1201) == kept
    assert decode_image(data, max_pixels=1199) == ImageProblem("decompression_bomb", "40x30 exceeds 1199 pixels")


def test_not_an_image_names_its_first_bytes() -> None:
    assert decode_image(b"hello world, this is text", max_pixels=10**6) == ImageProblem(
        "not_an_image", "unrecognised data starting b'hello world, thi'")


def test_a_truncated_image_is_corrupt_with_the_error_named() -> None:
    data = _encode(_gradient(64, 64))
    result = decode_image(data[: len(data) // 2], max_pixels=10**6)
    assert isinstance(result, ImageProblem) and result.reason == "corrupt_image"
    assert result.detail.startswith("OSError: ") and "truncated" in result.detail


def test_pillows_own_bomb_limits_are_bombs_and_warn_nobody() -> None:
    # over twice Pillow's MAX_IMAGE_PIXELS Pillow refuses to open: still a bomb, whatever our limit
    huge = decode_image(_png_header(20_000, 20_000), max_pixels=10**12)
    assert isinstance(huge, ImageProblem) and huge.reason == "decompression_bomb" and "20000" not in huge.reason
    assert "exceeds limit" in huge.detail or "could be decompression bomb" in huge.detail
    # between once and twice Pillow warns; we checked the size ourselves, so the warning is silenced
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = decode_image(_png_header(10_000, 10_000), max_pixels=10**12)
    assert isinstance(result, ImageProblem) and result.reason == "corrupt_image"  # the pixels are not there
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_resize_limit_at_below_and_above() -> None:
    data = _encode(_gradient(200, 100), compress_level=1)  # Pillow's default level would write other bytes
    assert decode_image(data, max_pixels=10**6, resize_max_side=200).data == data  # at the limit: untouched
    assert decode_image(data, max_pixels=10**6, resize_max_side=201).data == data
    img = _decoded(decode_image(data, max_pixels=10**6, resize_max_side=199))
    assert img.format == "PNG" and img.width == 199 and img.height in (99, 100)
    img = _decoded(decode_image(data, max_pixels=10**6, resize_max_side=50))
    assert img.size == (50, 25)
    tall = _decoded(decode_image(_encode(_gradient(20, 80)), max_pixels=10**6, resize_max_side=40))
    assert tall.size == (10, 40)  # the longer side is the one limited
    expected = _gradient(200, 100)
    expected.thumbnail((50, 50), Image.Resampling.LANCZOS)
    assert img.tobytes() == expected.tobytes()  # shrunk with Lanczos, like the hash's resize


def test_a_target_format_reencodes_only_another_format() -> None:
    png = _encode(_gradient(32, 32), compress_level=1)
    assert decode_image(png, max_pixels=10**6, image_format="PNG").data == png
    jpeg = _decoded(decode_image(png, max_pixels=10**6, image_format="JPEG"))
    assert jpeg.format == "JPEG" and jpeg.size == (32, 32)
    rgba = _decoded(decode_image(_encode(_gradient(32, 32, "RGBA")), max_pixels=10**6, image_format="JPEG"))
    assert rgba.mode == "RGB"  # JPEG has no alpha
    grey = _decoded(decode_image(_encode(_gradient(32, 32, "L")), max_pixels=10**6, image_format="JPEG"))
    assert grey.mode == "L"


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_quality_reaches_lossy_encoders(fmt: str) -> None:
    png = _encode(_gradient(64, 64))
    high = decode_image(png, max_pixels=10**6, image_format=fmt, quality=95)
    low = decode_image(png, max_pixels=10**6, image_format=fmt, quality=10)
    assert isinstance(high, DecodedImage) and isinstance(low, DecodedImage)
    assert len(low.data) < len(high.data)
    assert high.data == _encode(_gradient(64, 64), fmt, quality=95)
    assert decode_image(png, max_pixels=10**6, image_format=fmt) == high  # 95 unless told


def test_resizing_keeps_a_writable_format_and_turns_others_into_png() -> None:
    jpeg = _decoded(decode_image(_encode(_gradient(80, 80), "JPEG"), max_pixels=10**6, resize_max_side=40))
    assert (jpeg.format, jpeg.size) == ("JPEG", (40, 40))
    webp = _decoded(decode_image(_encode(_gradient(80, 80), "WEBP"), max_pixels=10**6, resize_max_side=40))
    assert webp.format == "WEBP"
    bmp = _decoded(decode_image(_encode(_gradient(80, 80), "BMP"), max_pixels=10**6, resize_max_side=40))
    assert (bmp.format, bmp.mode) == ("PNG", "RGB")
    # a palette image: RGBA if it has a transparent colour, RGB if not; a mode PNG holds is kept
    palette = _gradient(80, 80).convert("P")
    opaque = _decoded(decode_image(_encode(palette, "GIF"), max_pixels=10**6, resize_max_side=40))
    assert (opaque.format, opaque.mode) == ("PNG", "RGB")
    clear = _decoded(decode_image(_encode(palette, "GIF", transparency=0), max_pixels=10**6, resize_max_side=40))
    assert (clear.format, clear.mode) == ("PNG", "RGBA")
    rgb_key = _gradient(80, 80)  # an RGB PNG with a transparent colour (tRNS) stays RGB
    kept = _decoded(decode_image(_encode(rgb_key, transparency=(0, 0, 0)), max_pixels=10**6, resize_max_side=40))
    assert kept.mode == "RGB"
    for mode in ("LA", "RGBA", "L"):
        kept = _decoded(decode_image(_encode(_gradient(80, 80, mode)), max_pixels=10**6, resize_max_side=40))
        assert kept.mode == mode
    cmyk = _decoded(decode_image(_encode(_gradient(80, 80, "CMYK"), "JPEG"), max_pixels=10**6, image_format="PNG"))
    assert cmyk.mode == "RGB"


# ---- the resolver and the worker copy ----


def test_the_resolver_refuses_a_private_answer_and_passes_the_port() -> None:
    async def resolve(allow: bool, *args: object) -> list:
        resolver = CheckedResolver(allow)
        try:
            return await resolver.resolve("localhost", *args)
        finally:
            await resolver.close()

    with pytest.raises(PrivateAddressError, match=r"^localhost resolves to 127\.0\.0\.1: not a public address$"):
        asyncio.run(resolve(False, 80))
    [answer] = asyncio.run(resolve(True, 8080, socket.AF_INET))
    assert (answer["hostname"], answer["host"], answer["port"]) == ("localhost", "127.0.0.1", 8080)
    [answer] = asyncio.run(resolve(True))
    assert answer["port"] == 0


def test_a_fetcher_pickles_without_its_thread_and_keeps_its_rate() -> None:
    fetcher = FetchConfig(requests_per_second=4).build()
    fetcher._event_loop()  # what a first batch starts: a loop in a thread, not picklable
    try:
        copy = pickle.loads(pickle.dumps(fetcher))
    finally:
        fetcher.close()
    # the loop, its thread and the finalizer that stops them stay with the original
    assert copy._limiter.interval == 0.25 and "_runtime" not in copy.__dict__ and "_finalizer" not in copy.__dict__
    assert copy.config == fetcher.config


def test_an_alpha_band_survives_reencoding() -> None:
    # palette + alpha (PA) is no mode PNG writes: converted, keeping its alpha
    data, fmt, width, height = _rewrite(Image.new("PA", (6, 4)), "PNG", None, None, 95)
    assert (fmt, width, height, Image.open(io.BytesIO(data)).mode) == ("PNG", 6, 4, "RGBA")


def test_close_stops_the_download_thread() -> None:
    fetcher = FetchConfig().build()
    before = set(threading.enumerate())  # (an earlier test's closed fetcher may still be ending its thread)
    loop = fetcher._event_loop()
    assert fetcher._event_loop() is loop  # one loop for every batch
    # a daemon thread that says what it is (it never holds up the interpreter's exit)
    [thread] = [t for t in threading.enumerate() if t.name == "surd-fetch" and t.is_alive() and t not in before]
    assert thread.daemon
    deadline = time.monotonic() + 5
    while not loop.is_running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop.is_running()
    fetcher.close()
    while loop.is_running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not loop.is_running()


def test_fetched_images_are_reencoded_at_the_configured_quality_and_a_bare_redirect_is_dropped() -> None:
    with FakeCivitai(n_items=1) as server:
        base = {"allowed_hosts": ["127.0.0.1"], "allow_private_hosts": True, "max_retries": 0}
        fetcher = FetchConfig(**base, image_format="JPEG", quality=10).build()
        try:
            rows = [{"id": "a", "image_url": f"{server.base}/img/ok/3.png?size=40"},
                    {"id": "b", "image_url": f"{server.base}/img/status/302/a"}]
            row, bare = fetcher.process_batch(rows)
            runtime = fetcher._runtime
        finally:
            fetcher.close()
    assert runtime["session"].closed  # close closes the connections too, not only the thread
    assert row["image"]["bytes"] == _encode(Image.open(io.BytesIO(image_bytes(3, "png", 40))), "JPEG", quality=10)
    assert bare == Drop("bad_redirect", "HTTP 302 without Location")


class _Plain(BaseHTTPRequestHandler):
    """Answers with a PNG under whatever Content-Type the path names (`/none`: no Content-Type at all)."""

    types = {"/none": None, "/octet": "application/octet-stream; charset=binary", "/html": "text/html; charset=utf-8",
             "/png": "Image/PNG ; q=1", "/hangup": None}

    def do_GET(self) -> None:  # noqa: N802 (the http.server spelling)
        if self.path == "/hangup":
            self.close_connection = True  # no answer at all
            return
        body = _encode(_gradient(8, 8)) if self.path != "/html" else b"<!doctype html><title>login</title>"
        self.send_response(200)
        if self.types[self.path] is not None:
            self.send_header("Content-Type", self.types[self.path])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_content_types_an_image_may_come_with() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Plain)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    fetcher = FetchConfig(allowed_hosts=["127.0.0.1"], allow_private_hosts=True, max_retries=0).build()
    try:
        rows = [{"id": p, "image_url": base + p} for p in ("/none", "/octet", "/png", "/html")]
        none, octet, png, html = fetcher.process_batch(rows)
    finally:
        fetcher.close()
        server.shutdown()
        server.server_close()
    # no type, generic binary (parameters aside) and image/* in any case are images; the rest are not
    assert none["width"] == octet["width"] == png["width"] == 8
    assert html == Drop("not_an_image", "content-type text/html")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_each_failure_says_what_happened() -> None:
    plain = ThreadingHTTPServer(("127.0.0.1", 0), _Plain)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    options = {"allowed_hosts": ["127.0.0.1", "localhost", "nosuch.invalid"], "allow_private_hosts": True,
               "max_retries": 0, "timeout": 5.0, "total_timeout": 0.5}
    try:
        with FakeCivitai(n_items=1) as server:
            port = server.base.rsplit(":", 1)[1]
            urls = [f"{server.base}/img/slow/a?s=3", f"http://127.0.0.1:{_closed_port()}/a",
                    "http://nosuch.invalid/a", f"http://127.0.0.1:{plain.server_address[1]}/hangup",
                    f"{server.base}/img/truncated/a", f"http://localhost:{port}/img/ok/1.png"]
            fetcher = FetchConfig(**options).build()
            try:
                slow, refused, unknown, hangup, cut, local = fetcher.process_batch(
                    [{"id": str(i), "image_url": u} for i, u in enumerate(urls)])
            finally:
                fetcher.close()
            strict = FetchConfig(**{**options, "allow_private_hosts": False}).build()
            try:
                [private] = strict.process_batch([{"id": "p", "image_url": f"http://localhost:{port}/img/ok/1.png"}])
            finally:
                strict.close()
    finally:
        plain.shutdown()
        plain.server_close()
    assert slow == Drop("timeout", "no complete response within the time limits (0.5s)")
    assert refused.reason == "connect_error" and "Cannot connect to host 127.0.0.1" in refused.detail
    assert unknown.reason == "unknown_host" and "nosuch.invalid" in unknown.detail
    assert hangup == Drop("network_error", "ServerDisconnectedError: Server disconnected")
    assert cut.reason == "truncated" and "payload" in cut.detail.lower()
    assert isinstance(local, dict) and local["width"] > 0  # a host name resolving to loopback, allowed here
    assert private == Drop("private_host", "localhost resolves to 127.0.0.1: not a public address")


def _fetch_one(url: str, timeout: float, total_timeout: float) -> tuple[Any, float]:
    """One loopback row through a fetcher without retries: its result and the seconds it took."""
    fetcher = FetchConfig(allowed_hosts=["127.0.0.1"], allow_private_hosts=True, max_retries=0, timeout=timeout,
                          total_timeout=total_timeout).build()
    start = time.monotonic()
    try:
        [row] = fetcher.process_batch([{"id": "a", "image_url": url}])
    finally:
        fetcher.close()
    return row, time.monotonic() - start


def test_a_stalled_body_times_out_between_bytes() -> None:
    # a byte every 0.2 s never trips the total limit soon; the limit between received bytes does
    with FakeCivitai(n_items=1) as server:
        row, seconds = _fetch_one(f"{server.base}/img/drip/a", timeout=0.1, total_timeout=60)
    assert row.reason == "timeout" and seconds < 10


def test_every_row_is_reported_once_and_counted() -> None:
    with FakeCivitai(n_items=1) as server:
        fetcher = FetchConfig(allowed_hosts=["127.0.0.1"], allow_private_hosts=True, max_retries=0, concurrency=1,
                              per_host=1).build()
        calls: list[int] = []
        fetcher.on_rows = calls.append
        rows = [{"id": str(i), "image_url": f"{server.base}/img/ok/{i}.png"} for i in range(3)]
        rows += [{"id": "x", "image_url": f"{server.base}/img/status/404/x"}, {"id": "y", "image_url": None},
                 {"id": "z", "image": {"bytes": b"kept", "path": None}}]
        try:
            results = fetcher.process_batch(rows)
            fetcher.process_batch([rows[-1], {"id": "3", "image_url": f"{server.base}/img/ok/3.png"}])
        finally:
            fetcher.close()
    assert server.connections == 1  # one session across batches: the connection is reused
    assert calls == [1] * 6  # every download tried, not the row that had its bytes
    assert [r["image"] for r in results[:3]] == [{"bytes": image_bytes(i, "png"), "path": None} for i in range(3)]
    assert results[4] == Drop("no_image_url", "row has neither image bytes nor image_url")
    assert dict(fetcher.counters) == {"downloaded": 4, "bytes": sum(len(image_bytes(i, "png")) for i in range(4)),
                                      "passed_through": 2}


def test_url_problems_and_redirects_say_what_happened() -> None:
    with FakeCivitai(n_items=1) as server:
        base = server.base
        fetcher = FetchConfig(allowed_hosts=["127.0.0.1"], allow_private_hosts=True, max_retries=0,
                              max_redirects=2, timeout=2.0, total_timeout=4.0).build()
        urls = ["http://[::1", "ftp://127.0.0.1/a", "http:///a", f"https://{base.split('://')[1]}/img/ok/1.png",
                f"{base}/img/redirect?to=/img/redirect%3Fto%3D/img/ok/2.png", f"{base}/img/redirect?to=http://[::1",
                f"{base}/img/redirect-loop/k"]
        try:
            bad, ftp, nohost, tls, twice, bad_hop, loop = fetcher.process_batch(
                [{"id": str(i), "image_url": u} for i, u in enumerate(urls)])
        finally:
            fetcher.close()
    assert bad == Drop("bad_url", "Invalid IPv6 URL")
    assert ftp == Drop("bad_url", "scheme 'ftp' (only http and https)")
    assert nohost == Drop("bad_url", "no host in http:///a")
    assert isinstance(tls, Drop) and tls.reason != "bad_url"  # https is allowed (the loopback server has no TLS)
    # every redirect followed is counted: 2 on the way to ok/2.png, 1 to the bad hop, 3 around the loop
    assert twice["image"]["bytes"] == image_bytes(2) and fetcher.counters["redirects"] == 2 + 1 + 3
    assert bad_hop == Drop("bad_url", "redirect to 'http://[::1': Invalid IPv6 URL")
    assert loop == Drop("too_many_redirects", f"more than 2 redirects from {base}/img/redirect-loop/k")


def test_the_rate_limit_is_per_host() -> None:
    # one request every 2 s per host: two hosts (the same server by two names) do not wait for each other, a
    # second request to one of them does
    with FakeCivitai(n_items=1) as server:
        fetcher = FetchConfig(allowed_hosts=["127.0.0.1", "localhost"], allow_private_hosts=True, max_retries=0,
                              requests_per_second=0.5).build()
        try:
            start = time.monotonic()
            a, b = fetcher.process_batch([{"id": "a", "image_url": f"http://localhost:{server.port}/img/ok/1.png"},
                                          {"id": "b", "image_url": f"http://127.0.0.1:{server.port}/img/ok/2.png"}])
            both = time.monotonic() - start
            [c] = fetcher.process_batch([{"id": "c", "image_url": f"http://localhost:{server.port}/img/ok/3.png"}])
            again = time.monotonic() - start
        finally:
            fetcher.close()
    assert isinstance(a, dict) and isinstance(b, dict) and isinstance(c, dict)
    assert both < 1.8 <= again


def test_retry_settings_reach_the_policy() -> None:
    fetcher = FetchConfig(max_retries=2, backoff_base=0.5, retry_after_max=7).build()
    assert fetcher.policy == RetryPolicy(max_retries=2, backoff_base=0.5, retry_after_max=7)


def test_legacy_numeric_ipv4_hosts_are_bad_urls() -> None:
    # `127.1` or `2130706433` would reach 127.0.0.1 through the C resolver; aiohttp refuses such hosts outright,
    # and the refusal is a bad URL (final), not a network error to retry
    fetcher = FetchConfig(allowed_hosts=["*"], max_retries=0, total_timeout=5.0).build()
    try:
        short, number = fetcher.process_batch([{"id": "a", "image_url": "http://127.1/x"},
                                               {"id": "b", "image_url": "http://2130706433/x"}])
    finally:
        fetcher.close()
    assert short == Drop("bad_url", "127.1 - is not a canonical IPv4 address")
    assert number == Drop("bad_url", "2130706433 - is not a canonical IPv4 address")


def test_a_dns_failure_other_than_no_such_name_may_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # the system resolver (the outside world) answering "try again" for one name: transient, unlike "no such name"
    real = socket.getaddrinfo

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if host == "busy.example":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    fetcher = FetchConfig(allowed_hosts=["busy.example"], max_retries=0, total_timeout=5.0).build()
    try:
        [row] = fetcher.process_batch([{"id": "a", "image_url": "http://busy.example/x"}])
    finally:
        fetcher.close()
    assert row.reason == "dns_error" and "busy.example" in row.detail and "Temporary failure" in row.detail


def test_a_connection_never_accepted_times_out_after_the_connect_limit() -> None:
    # A listening socket whose accept queue is full: Linux drops further SYNs, so a connect neither succeeds nor
    # fails (a host that never answers). `timeout` bounds the connect; without it only `total_timeout` would.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):  # never accepted: they fill the queue
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        row, seconds = _fetch_one(f"http://127.0.0.1:{port}/x", timeout=0.3, total_timeout=20)
    finally:
        for sock in [*fillers, server]:
            sock.close()
    assert row.reason == "timeout" and seconds < 10


def test_retries_stop_at_the_limit_however_many_failures_follow() -> None:
    # three 503s before the image, two retries allowed: the third failure is final, and says how many retries
    with FakeCivitai(n_items=1) as server:
        fetcher = FetchConfig(allowed_hosts=["127.0.0.1"], allow_private_hosts=True, max_retries=2,
                              backoff_base=0.01).build()
        try:
            [row] = fetcher.process_batch([{"id": "a", "image_url": f"{server.base}/img/flaky/503/k?n=3"}])
        finally:
            fetcher.close()
        hits = server.hits["flaky/503/k"]
    assert row == Drop("http_503", "HTTP 503 (after 2 retries)")
    assert hits == 3 and fetcher.counters["retries"] == 2


def test_a_retry_after_holds_back_the_next_request_to_that_host() -> None:
    # a 429 asking for 1 s: the row is dropped (no retries here), and the host's next request still waits it out
    with FakeCivitai(n_items=1) as server:
        fetcher = FetchConfig(allowed_hosts=["127.0.0.1"], allow_private_hosts=True, max_retries=0).build()
        try:
            [refused] = fetcher.process_batch([{"id": "a", "image_url": f"{server.base}/img/flaky/429/k?n=1"}])
            start = time.monotonic()
            [row] = fetcher.process_batch([{"id": "b", "image_url": f"{server.base}/img/ok/1.png"}])
            waited = time.monotonic() - start
        finally:
            fetcher.close()
    assert refused == Drop("http_429", "HTTP 429") and isinstance(row, dict)
    assert waited >= 0.5


def test_a_private_address_literal_is_refused_before_connecting() -> None:
    fetcher = FetchConfig(allowed_hosts=["*"], max_retries=0).build()
    try:
        loopback, v6, lan = fetcher.process_batch([{"id": str(i), "image_url": u} for i, u in enumerate(
            ["http://127.0.0.1:9/x", "http://[::1]/x", "https://10.1.2.3/x"])])
    finally:
        fetcher.close()
    assert loopback == Drop("private_host", "127.0.0.1: not a public address")
    assert v6 == Drop("private_host", "::1: not a public address")
    assert lan == Drop("private_host", "10.1.2.3: not a public address")
