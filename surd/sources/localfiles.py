"""Helpers shared by the local-file sources: path safety, JSON-lines partitions, ids."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from surd.sources.genmeta import clean_text, gen_meta_json, safe_str
from surd.sources.metadata import PromptInfo, normalise_meta

MAX_SIDECAR_BYTES = 4 << 20


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
    """A small text file's content, or None when it is missing, unreadable or larger than `limit`."""
    try:
        if not path.is_file() or path.stat().st_size > limit:
            return None
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


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


def line_partitions(path: Path, rel: str, lines_per_part: int) -> list[dict[str, Any]]:
    """Split a JSON-lines file into partitions of whole lines: {"file", "offset" (bytes), "line" (1-based), "lines"}."""
    parts: list[dict[str, Any]] = []
    offset = 0
    line = 1
    with path.open("rb") as f:
        while True:
            start, first, count = offset, line, 0
            while count < lines_per_part:
                raw = f.readline()
                if not raw:
                    break
                offset += len(raw)
                line += 1
                count += 1
            if count:
                parts.append({"file": rel, "offset": start, "line": first, "lines": count})
            if count < lines_per_part:
                return parts


def read_lines(path: Path, partition: dict[str, Any]) -> Iterator[tuple[int, str]]:
    """(line number, text) of a partition's non-blank lines."""
    with path.open("rb") as f:
        f.seek(int(partition["offset"]))
        for i in range(int(partition["lines"])):
            raw = f.readline()
            if not raw:
                return
            text = raw.decode("utf-8", "replace").strip()
            if text:
                yield int(partition["line"]) + i, text
