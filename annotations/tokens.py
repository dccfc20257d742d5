"""Label Studio's two kinds of API token, for the requests we make ourselves (the SDK handles its own).

A *legacy token* goes in `Authorization: Token <key>`, and only works where the organization enables
legacy tokens (Label Studio 1.23 starts with them off). A *personal access token* (PAT, what the account
page offers) is a JWT refresh token: it is exchanged at `/api/token/refresh/` for an access token that
lives about five minutes and goes in `Authorization: Bearer <access>`
(https://labelstud.io/guide/access_tokens). The SDK makes the same exchange for its own calls.
Keys are never printed: errors name the kind of token, not the token.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import time
from collections.abc import Generator
from typing import Any

import httpx

from surd.errors import SurdError

LEGACY = "legacy token"
PERSONAL = "personal access token"
REFRESH_PATH = "/api/token/refresh/"
RENEW_EARLY_S = 30  # fetch a new access token this long before the current one runs out
WHERE = "Account & Settings > Personal Access Token"


class TokenError(SurdError):
    """The API key cannot work (expired, the wrong kind of JWT) or the server refused it."""


def _claims(key: str) -> dict[str, Any] | None:
    """The payload of a JWT (unverified: only the server can verify it), or None when `key` is not one."""
    parts = key.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def token_kind(key: str) -> str:
    """LEGACY or PERSONAL; a JWT that cannot work (expired, or a short-lived access token) is a TokenError."""
    claims = _claims(key)
    if claims is None:
        return LEGACY
    kind = claims.get("token_type")
    if kind == "access":
        raise TokenError(f"the API key is a short-lived access token: use your personal access token ({WHERE}); "
                         "surd exchanges it for access tokens itself")  # fmt: skip
    if kind != "refresh":
        raise TokenError(f"the API key is a JWT of type {kind!r}, not a personal access token ({WHERE})")
    expires = claims.get("exp")
    if isinstance(expires, (int, float)) and expires < time.time():
        when = dt.datetime.fromtimestamp(expires, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        raise TokenError(f"the personal access token expired on {when}: create a new one ({WHERE})")
    return PERSONAL


def server_detail(body: Any) -> str:
    """The server's own explanation from an error body (`detail`, or validation messages), on one short line."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body.strip()[:300]
    if not isinstance(body, dict):
        return str(body)[:300] if body else ""
    found = body.get("validation_errors") or body.get("detail") or ""
    if isinstance(found, dict):
        found = "; ".join(str(m) for messages in found.values() for m in (messages if isinstance(messages, list)
                                                                          else [messages]))  # fmt: skip
    # Label Studio appends tips after a blank line; the first paragraph says what is wrong.
    return " ".join(str(found).split("\n\n")[0].split())[:300]


def refused(url: str, kind: str, status: int, detail: str) -> TokenError:
    """The one message for a key the server turns down (never the key itself)."""
    because = f": {detail}" if detail else ""
    return TokenError(
        f"Label Studio at {url} refused the API key ({kind}; HTTP {status}{because}); set LABEL_STUDIO_API_KEY "
        f"or pass --api-key with a personal access token ({WHERE}), or a legacy token where the organization "
        "enables them"
    )


class TokenAuth(httpx.Auth):
    """httpx authentication for either kind: a legacy token as is, a PAT through renewed access tokens."""

    requires_response_body = True  # the refresh answer is read inside the flow

    def __init__(self, url: str, key: str) -> None:
        self.url = url.rstrip("/")
        self.kind = token_kind(key)
        self._key = key
        self.access_token: str | None = None  # the current access token (PAT only)
        self._expires = 0.0

    def __repr__(self) -> str:  # no key in tracebacks or logs
        return f"TokenAuth({self.url!r}, {self.kind})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.kind == LEGACY:
            request.headers["Authorization"] = f"Token {self._key}"
            yield request
            return
        if self.access_token is None or time.time() > self._expires - RENEW_EARLY_S:
            yield from self._renew()
        request.headers["Authorization"] = f"Bearer {self.access_token}"
        response = yield request
        if response.status_code == 401:  # it ran out in between (or the server forgot it): renew once, retry
            yield from self._renew()
            request.headers["Authorization"] = f"Bearer {self.access_token}"
            yield request

    def _renew(self) -> Generator[httpx.Request, httpx.Response, None]:
        response = yield httpx.Request("POST", f"{self.url}{REFRESH_PATH}", json={"refresh": self._key})
        if response.status_code != 200:
            raise refused(self.url, self.kind, response.status_code, server_detail(response.text))
        access = response.json().get("access")
        if not isinstance(access, str):
            raise TokenError(f"Label Studio at {self.url} answered {REFRESH_PATH} without an access token")
        self.access_token = access
        expires = (_claims(access) or {}).get("exp")
        self._expires = float(expires) if isinstance(expires, (int, float)) else time.time() + 60
