"""The bounds every source reader keeps, so that no input file can stall, exhaust or crash a shard.

A reader that meets something over a bound raises `OverBound(reason, detail)`; the source turns it into a
dropped row with that reason. The bounds (named in docs/sources-and-fetch.md):

- `MAX_TEXT_BYTES`: one metadata text (a PNG text chunk, inflated; an EXIF block; a sidecar; a JSON document);
- `MAX_JSON_DEPTH`: nesting of any JSON document (sidecars, chunks, JSON-lines rows);
- `MAX_GRAPH_NODES` / `MAX_WALK_STEPS`: nodes of a ComfyUI graph, and steps of the walk over it;
- `MAX_PARAMS_LINE`: the A1111 settings line (a longer last line is prompt text, not settings);
- `MAX_STEALTH_PIXELS`: pixels decoded to look for A1111 "stealth" metadata in the alpha channel;
- `MAX_LINE_BYTES`: one line of a JSON-lines file.
"""

from __future__ import annotations

import json
import os
import stat
import zlib
from pathlib import Path
from typing import Any

MAX_TEXT_BYTES = 8 << 20
MAX_JSON_DEPTH = 64
MAX_GRAPH_NODES = 10_000
MAX_WALK_STEPS = 200_000
MAX_PARAMS_LINE = 64 << 10
MAX_STEALTH_PIXELS = 4096 * 4096
MAX_LINE_BYTES = 16 << 20


class OverBound(Exception):
    """Input over one of the bounds: the row is dropped with `reason` (`metadata_too_large`, `json_too_deep`, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class NotJson(ValueError):
    """Text that is not a JSON document."""


def load_json(text: str | bytes, where: str) -> Any:
    """A JSON document within the size and depth bounds; `NotJson` when it is not JSON at all."""
    if len(text) > MAX_TEXT_BYTES:
        raise OverBound("metadata_too_large", f"{where}: {len(text)} bytes of JSON (limit {MAX_TEXT_BYTES})")
    try:
        value = json.loads(text)
    except RecursionError:  # the C decoder stops at the interpreter's recursion limit
        raise OverBound("json_too_deep", f"{where}: JSON nested deeper than {MAX_JSON_DEPTH}") from None
    except ValueError as e:
        raise NotJson(str(e)) from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise OverBound("json_too_deep", f"{where}: JSON nested deeper than {MAX_JSON_DEPTH}")
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value (a scalar is 0), measured without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def inflate(data: bytes, limit: int = MAX_TEXT_BYTES, wbits: int = zlib.MAX_WBITS) -> bytes | None:
    """Decompressed `data` when it inflates to at most `limit` bytes; None when it is corrupt.

    Raises `OverBound` for more (a zlib bomb): only `limit + 1` bytes are ever produced.
    """
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error:
        return None
    if len(out) > limit:
        raise OverBound("metadata_too_large", f"compressed text inflates past {limit} bytes")
    return out


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes.

    FIFOs, sockets and devices are refused without blocking (`not_a_regular_file`), larger files without
    reading them (`file_too_large`). Other OS errors propagate as OSError.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OverBound("not_a_regular_file", "not a regular file (a FIFO, socket or device)")
        if info.st_size > limit:
            raise OverBound("file_too_large", f"{info.st_size} bytes (limit {limit})")
        data = f.read(limit + 1)  # the file may have grown since fstat
    if len(data) > limit:
        raise OverBound("file_too_large", f"more than {limit} bytes")
    return data
