"""The fetch stage: download `image_url` for rows without image bytes, concurrently and defensively.

An asyncio event loop in a thread of the processor's own, with one aiohttp session kept across
batches, runs up to `concurrency` downloads (at most `per_host` per host). Every target is checked
before connecting: http/https only, host on the allow-list (default: the row's source CDN hosts),
addresses public unless `allow_private_hosts`. The address check sits in the session's DNS resolver,
so the connection goes only to addresses that passed it (DNS cannot answer differently in between);
each redirect hop is checked again. Bodies are streamed under a byte cap, Content-Type must be an
image (or generic binary), and the bytes are fully decoded under a pixel cap. Every failure is a
Drop with a reason; `TRANSIENT` reasons are retried with backoff, and again later by
`surd fetch --retry-failed` (`surd.fetch_retry`). Rows that already have image bytes pass through.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver
from pydantic import Field
from yarl import URL

from surd.fetch_image import DecodedImage, decode_image
from surd.rows import Drop, StageConfig
from surd.sources.http import RETRY_STATUSES, RateLimiter, RetryPolicy, host_allowed, is_public_ip, parse_retry_after
from surd.sources.http import user_agent as _user_agent

# Default allow-list per source: the CDN hosts its image URLs point at. Sources not listed: any public host.
SOURCE_HOSTS: dict[str, list[str]] = {
    "civitai": ["civitai.com", "*.civitai.com"],
    "lexica": ["lexica.art", "*.lexica.art", "lexica-serve-encoded-images.sharif.workers.dev",
               "lexica-serve-encoded-images2.sharif.workers.dev"],
}
# Failures that may succeed later; everything else is final.
TRANSIENT = frozenset(
    {"timeout", "connect_error", "network_error", "truncated", "dns_error"} | {f"http_{s}" for s in RETRY_STATUSES}
)
REDIRECTS = frozenset({301, 302, 303, 307, 308})
BINARY_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
# Bigger images are decoded in a worker thread (a second core); smaller ones decode faster than the hand-off.
INLINE_DECODE_BYTES = 64 * 1024


class FetchConfig(StageConfig):
    """The `fetch:` recipe section."""

    # A batch ends with its slowest download, so bigger batches idle less. They cost no extra memory:
    # batches never span shards, and the executor holds a whole shard's downloaded rows anyway.
    batch_size: int = Field(2048, ge=1, description="rows per call; each batch is downloaded concurrently")
    concurrency: int = Field(64, ge=1, description="downloads in flight")
    per_host: int = Field(16, ge=1, description="downloads in flight per host")
    requests_per_second: float | None = Field(None, gt=0, description="per-host rate limit (none by default)")
    timeout: float = Field(20.0, gt=0, description="seconds to connect, and between received bytes")
    total_timeout: float = Field(60.0, gt=0, description="seconds for one download attempt, all told")
    max_retries: int = Field(3, ge=0, description="retries of transient failures per image")
    backoff_base: float = Field(1.0, gt=0, description="seconds; doubles per retry, with jitter")
    retry_after_max: float = Field(60.0, ge=0, description="longer Retry-After: give up (retry later)")
    max_bytes: int = Field(20 * 1024 * 1024, ge=1, description="size cap, enforced while streaming")
    max_pixels: int = Field(50_000_000, ge=1, description="larger images are dropped as decompression bombs")
    max_redirects: int = Field(5, ge=0)
    allowed_hosts: list[str] | None = Field(
        None, description="hosts (or *.suffix, or *) for every row; default: each source's CDN hosts"
    )
    allow_private_hosts: bool = Field(False, description="allow private/loopback/link-local targets")
    resize_max_side: int | None = Field(None, ge=1, description="shrink larger images to this side")
    image_format: Literal["JPEG", "PNG", "WEBP"] | None = Field(None, description="re-encode to this format")
    quality: int = Field(95, ge=1, le=100, description="JPEG/WEBP quality when re-encoding")

    def build(self) -> Fetcher:
        return Fetcher(self)


@dataclass(frozen=True)
class Failure:
    reason: str
    detail: str = ""
    retry_after: float | None = None

    @property
    def transient(self) -> bool:
        return self.reason in TRANSIENT


@dataclass(frozen=True)
class _Body:
    data: bytes


@dataclass(frozen=True)
class _Redirect:
    location: str


def has_image(row: dict[str, Any]) -> bool:
    image = row.get("image")
    return isinstance(image, dict) and bool(image.get("bytes"))


class PrivateAddressError(OSError):
    """Raised by the resolver for a non-public answer; aiohttp passes it through as `os_error`."""


class CheckedResolver(AbstractResolver):
    """Resolves, then refuses non-public answers: the connection goes only to addresses that passed."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        answers = await self._inner.resolve(host, port, family)
        if not self.allow_private:
            for answer in answers:
                if not is_public_ip(answer["host"]):
                    raise PrivateAddressError(f"{host} resolves to {answer['host']}: not a public address")
        return answers

    async def close(self) -> None:
        await self._inner.close()


class Fetcher:
    """The fetch processor (see module doc). Holds only plain data until a batch runs."""

    on_rows: Callable[[int], None] | None = None  # lent by the executor while a batch runs: one call per download

    def __init__(self, config: FetchConfig) -> None:
        self.config = config
        self.policy = RetryPolicy(
            max_retries=config.max_retries, backoff_base=config.backoff_base, retry_after_max=config.retry_after_max
        )
        self.counters: dict[str, int] = defaultdict(int)
        self._limiter = RateLimiter(config.requests_per_second)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_limiter", "_runtime", "_finalizer"):
            state.pop(key, None)  # threads, locks and sockets stay in the process that made them
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._limiter = RateLimiter(self.config.requests_per_second)

    def setup(self) -> None:
        pass

    def process_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        results: list[dict[str, Any] | Drop] = list(rows)
        todo = [i for i, row in enumerate(rows) if not has_image(row)]
        self.counters["passed_through"] += len(rows) - len(todo)
        if todo:
            loop = self._event_loop()
            fetched = asyncio.run_coroutine_threadsafe(self._fetch_all([rows[i] for i in todo]), loop).result()
            for i, result in zip(todo, fetched, strict=True):
                results[i] = result
        return results

    def close(self) -> None:
        """Close the connections and stop the download thread (also done at exit)."""
        finalizer = self.__dict__.get("_finalizer")
        if finalizer is not None:
            finalizer()

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        # One loop in a thread of its own, kept across batches: connections (and TLS sessions) are
        # reused from batch to batch, and callers that already run an event loop are not disturbed.
        runtime = self.__dict__.get("_runtime")
        if runtime is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="surd-fetch", daemon=True).start()
            runtime = self._runtime = {"loop": loop, "session": None}
            self._finalizer = weakref.finalize(self, _shutdown, runtime)
        return runtime["loop"]

    def _session(self) -> aiohttp.ClientSession:
        runtime = self._runtime
        if runtime["session"] is None:
            config = self.config
            connector = aiohttp.TCPConnector(
                limit=config.concurrency,
                limit_per_host=config.per_host,
                resolver=CheckedResolver(config.allow_private_hosts),
            )
            timeout = aiohttp.ClientTimeout(
                total=config.total_timeout, sock_connect=config.timeout, sock_read=config.timeout
            )
            # trust_env stays False: an environment proxy would connect on our behalf, past the address checks
            runtime["session"] = aiohttp.ClientSession(
                connector=connector, timeout=timeout, headers={"User-Agent": _user_agent()}
            )
        return runtime["session"]

    # --- one batch -----------------------------------------------------------------------------

    async def _fetch_all(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        session = self._session()
        gate = asyncio.Semaphore(self.config.concurrency)
        report = self.on_rows

        async def fetch(row: dict[str, Any]) -> dict[str, Any] | Drop:
            result = await self._fetch_row(session, gate, row)
            if report is not None:
                report(1)
            return result

        return list(await asyncio.gather(*(fetch(row) for row in rows)))

    async def _fetch_row(
        self, session: aiohttp.ClientSession, gate: asyncio.Semaphore, row: dict[str, Any]
    ) -> dict[str, Any] | Drop:
        url = row.get("image_url")
        if not url:
            return Drop("no_image_url", "row has neither image bytes nor image_url")
        allowed = self.config.allowed_hosts
        if allowed is None:
            allowed = SOURCE_HOSTS.get(str(row.get("source")))
        attempt = 0
        while True:
            async with gate:  # released while backing off, so waiting rows do not hold slots
                outcome = await self._download(session, url, allowed)
                if isinstance(outcome, _Body):
                    if len(outcome.data) > INLINE_DECODE_BYTES:
                        decoded = await asyncio.to_thread(self._decode, outcome.data)  # Pillow frees the GIL
                    else:
                        decoded = self._decode(outcome.data)
            if isinstance(outcome, _Body):
                if isinstance(decoded, DecodedImage):
                    self.counters["downloaded"] += 1
                    self.counters["bytes"] += len(outcome.data)
                    return {**row, "image": {"bytes": decoded.data, "path": None}, "image_format": decoded.image_format,
                            "width": decoded.width, "height": decoded.height, "sha256": decoded.sha256}
                return Drop(decoded.reason, decoded.detail)
            delay = self.policy.delay(attempt, outcome.retry_after) if outcome.transient else None
            if delay is None:
                suffix = f" (after {attempt} retries)" if attempt else ""
                return Drop(outcome.reason, f"{outcome.detail}{suffix}".strip())
            self.counters["retries"] += 1
            await asyncio.sleep(delay)
            attempt += 1

    def _decode(self, data: bytes) -> Any:
        c = self.config
        return decode_image(
            data, max_pixels=c.max_pixels, resize_max_side=c.resize_max_side, image_format=c.image_format,
            quality=c.quality,
        )

    async def _download(self, session: aiohttp.ClientSession, url: str, allowed: list[str] | None) -> _Body | Failure:
        """One attempt: follow up to `max_redirects` redirects, checking every hop."""
        try:
            current = URL(url)
        except (ValueError, TypeError) as e:
            return Failure("bad_url", str(e))
        for _hop in range(self.config.max_redirects + 1):
            problem = self._check(current, allowed)
            if problem is not None:
                return problem
            host_key = f"{current.raw_host}:{current.port}"
            await self._limiter.await_slot(host_key)
            result = await self._get(session, current)
            if isinstance(result, Failure) and result.retry_after:
                self._limiter.defer(host_key, result.retry_after)  # slow down every request to this host
            if not isinstance(result, _Redirect):
                return result
            self.counters["redirects"] += 1
            try:
                current = current.join(URL(result.location))
            except ValueError as e:
                return Failure("bad_url", f"redirect to {result.location!r}: {e}")
        return Failure("too_many_redirects", f"more than {self.config.max_redirects} redirects from {url}")

    def _check(self, url: URL, allowed: list[str] | None) -> Failure | None:
        """Scheme, allow-list and (for IP literals) address checks; host names are checked by the resolver."""
        if url.scheme not in ("http", "https"):
            return Failure("bad_url", f"scheme {url.scheme!r} (only http and https)")
        host = url.raw_host
        if not host:
            return Failure("bad_url", f"no host in {url}")
        if not host_allowed(host, allowed):
            return Failure("host_not_allowed", f"{host} is not in the allow-list")
        if _is_ip(host) and not self.config.allow_private_hosts and not is_public_ip(host):
            return Failure("private_host", f"{host}: not a public address")
        return None

    async def _get(self, session: aiohttp.ClientSession, url: URL) -> _Body | _Redirect | Failure:
        try:
            async with session.get(url, allow_redirects=False) as response:
                return await self._read(response)
        except asyncio.TimeoutError:
            return Failure("timeout", f"no complete response within the time limits ({self.config.total_timeout:g}s)")
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, PrivateAddressError):
                return Failure("private_host", str(e.os_error))
            if isinstance(e, aiohttp.ClientConnectorDNSError):
                # "no such name" is final; anything else (EAI_AGAIN, a resolver timeout) may pass
                final = isinstance(e.os_error, socket.gaierror) and e.os_error.errno == socket.EAI_NONAME
                return Failure("unknown_host" if final else "dns_error", str(e))
            return Failure("connect_error", str(e))
        except aiohttp.ClientPayloadError as e:
            return Failure("truncated", str(e))
        except aiohttp.InvalidURL as e:
            return Failure("bad_url", str(e))
        except aiohttp.ClientError as e:
            return Failure("network_error", f"{type(e).__name__}: {e}")

    async def _read(self, response: aiohttp.ClientResponse) -> _Body | _Redirect | Failure:
        status = response.status
        if status in REDIRECTS:
            location = response.headers.get("Location")
            return _Redirect(location) if location else Failure("bad_redirect", f"HTTP {status} without Location")
        if status != 200:
            return Failure(f"http_{status}", f"HTTP {status}", parse_retry_after(response.headers.get("Retry-After")))
        ctype = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not (ctype.startswith("image/") or ctype in BINARY_TYPES):
            return Failure("not_an_image", f"content-type {ctype}")
        cap = self.config.max_bytes
        if response.content_length is not None and response.content_length > cap:
            return Failure("too_large", f"content-length {response.content_length} > {cap} bytes")
        body = bytearray()
        async for chunk in response.content.iter_chunked(1 << 16):  # decoded bytes: gzip bombs stop at the cap too
            body += chunk
            if len(body) > cap:
                return Failure("too_large", f"more than {cap} bytes")
        return _Body(bytes(body))


def _is_ip(host: str) -> bool:
    try:
        is_public_ip(host)
        return True
    except ValueError:
        return False


def _shutdown(runtime: dict[str, Any]) -> None:
    loop = runtime["loop"]
    if not loop.is_running():
        return
    session = runtime["session"]
    if session is not None:
        try:
            asyncio.run_coroutine_threadsafe(session.close(), loop).result(timeout=5)
        except Exception:  # closing is best effort: the process may be exiting
            pass
    loop.call_soon_threadsafe(loop.stop)
