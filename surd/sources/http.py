"""Polite HTTP for sources and the fetch stage.

One User-Agent naming the tool, a per-host rate limit, bounded retries with jittered exponential
backoff on 429/500/502/503/504 (honouring `Retry-After`), no retry on other 4xx, and a guard that
refuses private, loopback and link-local targets. API keys travel only in headers and never appear
in messages, reprs or logs.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
from pydantic import Field

from surd.errors import SourceError
from surd.secrets import api_key_for, known_secrets, redact
from surd.sources.base import SourceConfig

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def surd_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("surd")
    except PackageNotFoundError:
        return "0.0.0"


def user_agent() -> str:
    """`surd/<version> (SURD dataset builder[; contact])`: tells site operators what is calling.

    Operators of a crawl should name themselves: set SURD_CONTACT to an e-mail or URL.
    """
    contact = os.environ.get("SURD_CONTACT", "").strip()
    return f"surd/{surd_version()} (SURD dataset builder{'; ' + contact if contact else ''})"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date); None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: exponential backoff with jitter, or the server's `Retry-After` (up to `retry_after_max`)."""

    max_retries: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    retry_after_max: float = 300.0

    def retryable(self, status: int) -> bool:
        return status in RETRY_STATUSES

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        """Seconds before retry number `attempt + 1`, or None to give up."""
        if attempt >= self.max_retries:
            return None
        if retry_after is not None and retry_after > self.retry_after_max:
            return None  # the server asks for longer than we are willing to hold this request
        if retry_after is not None:
            # honour the server's wait; a little jitter keeps many clients from returning in lockstep
            return retry_after + random.uniform(0, min(1.0, self.backoff_base))
        cap = min(self.backoff_max, self.backoff_base * 2**attempt)
        return cap / 2 + random.uniform(0, cap / 2)  # "equal jitter": never less than half the backoff


def _host_key(url: httpx.URL) -> str:
    return f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"


class RateLimiter:
    """Thread-safe minimum interval between requests to the same host; `defer` pushes a host back."""

    def __init__(self, per_second: float | None) -> None:
        self.interval = 1.0 / per_second if per_second else 0.0
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def reserve(self, host: str) -> float:
        """Claim the next slot for `host`; return seconds to wait before using it."""
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next.get(host, 0.0))
            self._next[host] = slot + self.interval
            return slot - now

    def defer(self, host: str, seconds: float) -> None:
        with self._lock:
            self._next[host] = max(self._next.get(host, 0.0), time.monotonic() + seconds)

    def wait(self, host: str) -> None:
        delay = self.reserve(host)
        if delay > 0:
            time.sleep(delay)

    async def await_slot(self, host: str) -> None:
        delay = self.reserve(host)
        if delay > 0:
            await asyncio.sleep(delay)


class PoliteClient:
    """A synchronous JSON client for paged APIs, with the politeness rules above."""

    def __init__(
        self,
        *,
        requests_per_second: float | None = 1.0,
        policy: RetryPolicy | None = None,
        timeout: float = 30.0,
        api_key: str | None = None,
        key_note: str = "",
    ) -> None:
        self.policy = policy or RetryPolicy()
        self._secrets = known_secrets(api_key)  # a server's error text may echo any key we know of
        self._key_note = key_note  # why a configured key was not sent: said beside a refusal (401, 403)
        self.limiter = RateLimiter(requests_per_second)
        headers = {"User-Agent": user_agent(), "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(headers=headers, timeout=timeout, follow_redirects=True)

    def __repr__(self) -> str:  # never show headers (the API key)
        return f"PoliteClient(policy={self.policy})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> PoliteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_json(
        self, url: str, params: dict[str, Any] | None = None, validate: Callable[[Any], None] | None = None
    ) -> tuple[Any, bytes, str]:
        """GET and parse JSON, retrying transient failures; return (data, raw body, final URL).

        A body that is not JSON, or that `validate` rejects with ValueError, counts as transient: it is
        usually a cut-off transfer or a proxy's error page.
        """
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                response = self._request(url, params)
                status = response.status_code
                if status == 200:
                    raw = response.content
                    try:
                        data = json.loads(raw)
                        if validate is not None:
                            validate(data)
                        return data, raw, str(response.url)
                    except (ValueError, RecursionError) as e:
                        problem = f"malformed response ({e})"
                elif self.policy.retryable(status):
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
                    problem = f"HTTP {status}"
                    if retry_after:
                        self.limiter.defer(_host_key(response.url), retry_after)
                else:
                    detail = redact(response.text[:200].strip(), self._secrets)
                    note = f"; {self._key_note}" if self._key_note else ""
                    raise SourceError(f"GET {_public(response.url)}: HTTP {status} (not retried): {detail}{note}")
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            delay = self.policy.delay(attempt, retry_after)
            if delay is None:
                raise SourceError(f"GET {_public(httpx.URL(url, params=params))}: {problem} after {attempt} retries")
            time.sleep(delay)
            attempt += 1

    def _request(self, url: str, params: dict[str, Any] | None) -> httpx.Response:
        target = httpx.URL(url, params=params)
        self.limiter.wait(_host_key(target))
        return self._client.get(target)


def _public(url: httpx.URL) -> str:
    """The URL with any `token` query parameter removed (Civitai also accepts keys there)."""
    params = [(k, v) for k, v in url.params.multi_items() if k.lower() not in ("token", "api_key", "key")]
    return str(url.copy_with(params=params))


class ApiSourceConfig(SourceConfig):
    """Options shared by sources that call a web API (each sets its own `api_base` default)."""

    # Politeness settings may change between a run and its resumption; they do not change the rows.
    RUN_OPTIONS: ClassVar[frozenset[str]] = SourceConfig.RUN_OPTIONS | {
        "requests_per_second", "max_retries", "backoff_base", "timeout", "api_key_env",
    }

    api_base: str = Field(..., description="API root; mirrors, proxies and tests")
    requests_per_second: float = Field(1.0, gt=0, description="per-host rate limit")
    max_retries: int = Field(5, ge=0, description="retries of 429/5xx/network errors/bad JSON per request")
    backoff_base: float = Field(1.0, gt=0, description="seconds; doubles per retry, with jitter")
    timeout: float = Field(30.0, gt=0, description="seconds per request")

    def client(self, url: str | None = None) -> PoliteClient:
        """A client for requests to `url`, sending `$api_key_env`'s key only if it is for that host."""
        env_name = getattr(self, "api_key_env", None)
        key, note = api_key_for(url, env_name) if url and env_name else (None, "")
        policy = RetryPolicy(max_retries=self.max_retries, backoff_base=self.backoff_base)
        return PoliteClient(requests_per_second=self.requests_per_second, policy=policy, timeout=self.timeout,
                            api_key=key, key_note=note)

    def endpoint(self, path: str) -> str:
        return self.api_base.rstrip("/") + "/" + path.lstrip("/")


# --- where we may connect -------------------------------------------------------------------------


def is_public_ip(address: str) -> bool:
    """False for private, loopback, link-local, multicast, reserved and unspecified addresses."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def host_allowed(host: str, allowed: list[str] | None) -> bool:
    """Match a host against an allow-list of names, `*.suffix` patterns and `*` (None: everything)."""
    if allowed is None:
        return True
    host = host.lower().rstrip(".")
    for pattern in allowed:
        pattern = pattern.lower().rstrip(".")
        if pattern == "*" or pattern == host:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False

