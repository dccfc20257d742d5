"""Helpers shared by the local-file sources: path safety, bounded file and JSON-lines reading, ids."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from surd.sources.bounds import MAX_LINE_BYTES, OverBound, load_json, read_regular
from surd.sources.genmeta import clean_text, gen_meta_json, safe_str
from surd.sources.infotext import normalise_meta
from surd.sources.readings import PromptInfo

MAX_SIDECAR_BYTES = 4 << 20
MAX_IMAGE_BYTES = 256 << 20  # an image file named by a table or metadata.jsonl
_CHUNK = 1 << 20


def safe_join(root: Path, rel: str, *, allow_symlinks: bool = True) -> Path | None:
    """`root / rel` when `rel` is a plain relative path that stays inside `root`, else None.

    Refused: absolute paths (POSIX or Windows), drive letters, `..` components, NUL bytes, and paths
    that resolve outside `root` through a symlink (or through any symlink when `allow_symlinks` is false).
    Backslashes count as separators, since metadata files are often written on Windows.
    """
    if not isinstance(rel, str) or not rel or "\0" in rel:
        return None
    posix = rel.replace("\\", "/")
    pure = PurePosixPath(posix)
    if pure.is_absolute() or PureWindowsPath(rel).drive or ".." in pure.parts:
        return None
    base = root.resolve()
    path = base / pure
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loops, names the OS cannot encode
        return None
    if not resolved.is_relative_to(base):
        return None
    if not allow_symlinks and resolved != path:
        return None
    return path


def read_small(path: Path, limit: int = MAX_SIDECAR_BYTES) -> str | None:
    """A small text file's content, or None when it is missing, unreadable, not a regular file or over `limit`."""
    try:
        return read_regular(path, limit).decode("utf-8", "replace")
    except (OSError, OverBound):
        return None


def read_image_file(path: Path, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """An image file's bytes; `OverBound` for a FIFO, device or socket (never opened blocking) or a huge file."""
    return read_regular(path, limit)


def is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def hex_id(*parts: str | bytes, n: int = 24) -> str:
    """The first `n` hex digits of sha256 over the parts, NUL-separated."""
    h = hashlib.sha256()
    for i, part in enumerate(parts):
        if i:
            h.update(b"\0")
        # surrogatepass: file names that are not UTF-8 arrive with surrogate escapes
        h.update(part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part)
    return h.hexdigest()[:n]


def meta_json(raw: dict[str, Any]) -> str | None:
    """The `gen_meta` column for a table's or metadata line's extra fields (None when there are none)."""
    return gen_meta_json(**normalise_meta(raw)) if raw else None


def prompt_columns(info: PromptInfo) -> dict[str, Any]:
    """`keyword_prompt_raw`, `negative_prompt` and `gen_meta` (with `meta_source`) from a parsed prompt."""
    meta = dict(info.gen_meta)
    source_meta = meta.pop("source_meta", None)
    return {
        "keyword_prompt_raw": safe_str(info.prompt),
        "negative_prompt": clean_text(info.negative_prompt),
        "gen_meta": gen_meta_json(source_meta, **meta, meta_source=info.origin),
    }


def _read_line(f: Any) -> tuple[bytes, int]:
    """(the line, or its first MAX_LINE_BYTES + 1 bytes when longer; its full length in bytes)."""
    raw = f.readline(MAX_LINE_BYTES + 1)
    size = len(raw)
    if size > MAX_LINE_BYTES and not raw.endswith(b"\n"):
        while True:  # skip the rest of an over-long line without holding it
            more = f.readline(_CHUNK)
            size += len(more)
            if not more or more.endswith(b"\n"):
                break
    return raw, size


def line_partitions(path: Path, rel: str, lines_per_part: int) -> list[dict[str, Any]]:
    """Split a JSON-lines file into partitions of whole lines: {"file", "offset" (bytes), "line" (1-based), "lines"}."""
    parts: list[dict[str, Any]] = []
    offset = 0
    line = 1
    with path.open("rb") as f:
        while True:
            start, first, count = offset, line, 0
            while count < lines_per_part:
                raw, size = _read_line(f)
                if not raw:
                    break
                offset += size
                line += 1
                count += 1
            if count:
                parts.append({"file": rel, "offset": start, "line": first, "lines": count})
            if count < lines_per_part:
                return parts


def read_lines(path: Path, partition: dict[str, Any]) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of a partition's non-blank lines; text None for a line over MAX_LINE_BYTES."""
    with path.open("rb") as f:
        f.seek(int(partition["offset"]))
        for i in range(int(partition["lines"])):
            raw, size = _read_line(f)
            if not raw:
                return
            if size > MAX_LINE_BYTES:
                yield int(partition["line"]) + i, None
                continue
            text = raw.decode("utf-8", "replace").strip()
            if text:
                yield int(partition["line"]) + i, text


def json_line(text: str | None, where: str) -> Any:
    """One JSON-lines record within the bounds: raises `OverBound` (too long, too deep) or ValueError (not JSON)."""
    if text is None:
        raise OverBound("metadata_too_large", f"{where}: a line over {MAX_LINE_BYTES} bytes")
    return load_json(text, where)
