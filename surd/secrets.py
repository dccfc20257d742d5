"""Where an API key may be sent, and keeping keys out of everything stored or printed.

A key lives in the environment, and so does the host it is for. A recipe (a file people share) names only the
variable that holds a key (`api_key_env`); it cannot send the key anywhere else by changing `base_url`:

- `OPENAI_API_KEY` is for `api.openai.com`, `CIVITAI_API_KEY` for `civitai.com`;
- a key in `$NAME` is for the host in `$NAME_HOST` (`host` or `host:port`; this also rebinds `OPENAI_API_KEY`);
- a key with no host is never sent; a request to another host goes without it.

A key (or credentials written into the URL) travels over plain http only to a loopback host (`localhost`,
127.0.0.0/8, ::1): anywhere else it must be https. Messages from servers are passed through `redact` before they
are stored (a drop detail) or printed: `Authorization` values, bearer tokens, URL credentials and the values of
key-like environment variables become `[redacted]`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from urllib.parse import urlsplit

from surd.errors import SurdError

# keys whose host is known without `$NAME_HOST`
KEY_HOSTS = {"OPENAI_API_KEY": "api.openai.com", "CIVITAI_API_KEY": "civitai.com"}
REDACTED = "[redacted]"

_AUTH_VALUE = re.compile(r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=]?\s*[\"']?)(?:(?:bearer|token|basic)\s+)?"
                         r"[^\s\"',;}]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")
_KEY_LIKE_VARIABLE = re.compile(r"(?i)(KEY|TOKEN|SECRET|PASSWORD)$")


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (no name is resolved: a name could resolve anywhere later)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port(parts: object) -> int | None:
    try:
        return parts.port  # type: ignore[attr-defined]
    except ValueError:
        return None


def key_host(env_name: str) -> str | None:
    """The host (`host` or `host:port`) a key in `$env_name` is for, or None."""
    return os.environ.get(f"{env_name}_HOST") or KEY_HOSTS.get(env_name)


def _host_matches(url: str, bound: str) -> bool:
    target = urlsplit(url)
    wanted = urlsplit(f"//{bound.strip()}")
    if (target.hostname or "").lower() != (wanted.hostname or "").lower():
        return False
    if _port(wanted) is None:
        return True
    default = {"http": 80, "https": 443}.get(target.scheme)
    return (_port(target) or default) == _port(wanted)


def api_key_for(url: str, env_name: str | None) -> tuple[str | None, str]:
    """The key to send to `url` from `$env_name` (or None) and, when one is configured but not sent, why.

    Raises SurdError when a key (or credentials in the URL) would travel over plain http to a host that is not
    loopback."""
    parts = urlsplit(url)
    off_machine_http = parts.scheme == "http" and not is_loopback(parts.hostname or "")
    if off_machine_http and (parts.username or parts.password):
        raise SurdError(f"{redact(url)}: credentials in a plain-http URL to a host that is not loopback; use https")
    key = os.environ.get(env_name) if env_name else None
    if not key:
        return None, ""
    bound = key_host(env_name)  # type: ignore[arg-type]
    if bound is None:
        return None, f"${env_name} is not sent: set ${env_name}_HOST to the host it is for"
    if not _host_matches(url, bound):
        return None, f"${env_name} is for {bound}, so it was not sent to {parts.netloc.rpartition('@')[2]}"
    if off_machine_http:
        raise SurdError(f"{redact(url)}: ${env_name} would travel over plain http to a host that is not loopback; "
                        "use https")
    return key, ""


def known_secrets(*extra: str | None) -> list[str]:
    """Values to redact: `extra` plus every environment variable whose name ends in KEY, TOKEN, SECRET, PASSWORD."""
    values = [v for k, v in os.environ.items() if _KEY_LIKE_VARIABLE.search(k)] + [x for x in extra if x]
    return sorted({v for v in values if len(v) >= 6}, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` without Authorization values, bearer tokens, URL credentials and known secret values."""
    for secret in known_secrets() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    text = _URL_CREDENTIALS.sub(rf"\1{REDACTED}@", text)
    text = _AUTH_VALUE.sub(rf"\1{REDACTED}", text)
    return _BEARER.sub(rf"\1{REDACTED}", text)
