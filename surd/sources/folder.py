"""The `folder` source: a folder (recursive) of generated images with their prompts embedded or in sidecars.

Prompts come from `surd.sources.metadata`: the image's embedded metadata first, then `<stem>.json`, then
`<stem>.txt`; the first prompt found wins. Without one, the row is dropped with the first reason a reader gave
(`prompt_not_stored`, `unknown_metadata_format`, a bound's reason, ...) or `no_prompt`. A comment without
generation settings is a prompt only with `bare_comments: true`.

Listing reads names only; reading a partition reads each file's bytes and parses chunk headers, never pixels
(the clean stage decodes), except to look for A1111 stealth metadata in a PNG that has nothing else. Hidden
files and folders (`.name`) are skipped, and so are symlinks unless `follow_symlinks` is set, and then only
those that stay inside the folder; FIFOs, devices and sockets are never opened (`not_a_regular_file`).

`explain(paths)` says, for each file, which readers found what: the first thing to run when a row surprises.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from surd.errors import SourceError
from surd.rows import Drop
from surd.sources import metadata
from surd.sources.base import Row, SourceConfig
from surd.sources.bounds import OverBound, read_regular
from surd.sources.genmeta import gen_meta_json, safe_str
from surd.sources.localfiles import MAX_SIDECAR_BYTES, hex_id, prompt_columns, safe_join
from surd.sources.readings import NoPrompt, PromptInfo, Reading

SOURCE = "folder"
SIDECARS = ("json", "txt")


class FolderConfig(SourceConfig):
    """`collect: [{type: folder, path: ./images}]`"""

    type: Literal["folder"] = "folder"
    path: Path = Field(description="the folder to scan, recursively")
    extensions: list[str] = Field(
        default_factory=lambda: ["png", "jpg", "jpeg", "webp"], description="image file extensions (any case)"
    )
    follow_symlinks: bool = Field(False, description="follow symlinks that stay inside the folder")
    max_file_bytes: int = Field(256 << 20, ge=1, description="larger files are dropped (file_too_large)")
    bare_comments: bool = Field(
        False, description="read a comment without generation settings (JPEG COM, PNG Comment, EXIF) as the prompt"
    )

    def build(self) -> FolderSource:
        return FolderSource(self)


def _walk(root: Path, extensions: set[str], follow: bool) -> list[str]:
    """Relative POSIX paths of the image files under `root`, sorted."""
    found: list[str] = []
    visited = {root}
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)  # a deterministic walk
        except OSError:
            continue  # an unreadable subfolder: its files cannot be collected anyway
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            path = Path(entry.path)
            if entry.is_symlink():
                if not follow:
                    continue
                try:
                    path = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    continue
                if not path.is_relative_to(root):
                    continue
            if path.is_dir():
                real = path.resolve()
                if real not in visited:  # guards against symlink loops
                    visited.add(real)
                    stack.append((path, rel + "/"))
            elif path.suffix.lower().lstrip(".") in extensions and path.is_file():
                found.append(rel)
    return sorted(found)


class FolderSource:
    """A `PartitionedSource` over a folder of images."""

    def __init__(self, config: FolderConfig) -> None:
        self.config = config
        self.name = config.folder
        self.extensions = {e.lower().lstrip(".") for e in config.extensions}

    def _root(self) -> Path:
        root = Path(self.config.path).expanduser()
        if not root.is_dir():
            raise SourceError(f"folder source: {self.config.path} is not a folder")
        return root.resolve()

    def list_partitions(self) -> list[list[str]]:
        files = _walk(self._root(), self.extensions, self.config.follow_symlinks)
        n = self.config.rows_per_shard
        return [files[i:i + n] for i in range(0, len(files), n)]

    def read_partition(self, partition: list[str]) -> Iterator[Row | Drop]:
        root = self._root()
        for rel in partition:
            yield self.read_file(root, rel)

    def read_file(self, root: Path, rel: str) -> Row | Drop:
        """One image file as a row (or a Drop with the reason)."""
        data, found, _ = self.examine(root, rel)
        name = safe_str(rel)  # for messages: file names need not be UTF-8
        row = self._base(rel, data or b"")
        if data is not None:
            row["image"] = {"bytes": data, "path": row["source_id"]}
        if isinstance(found, PromptInfo):
            row.update(prompt_columns(found))
            return row
        if found is None:
            return Drop("no_prompt", f"{name}: no embedded prompt and no .json/.txt sidecar", row=row)
        if found.gen_meta:
            meta = dict(found.gen_meta)
            row["gen_meta"] = gen_meta_json(meta.pop("source_meta", None), **meta, meta_source=found.origin)
        return Drop(found.reason, found.detail if name in found.detail else f"{name}: {found.detail}", row=row)

    def examine(self, root: Path, rel: str) -> tuple[bytes | None, Reading | None, list[Reading]]:
        """(the file's bytes, the reading that decides its row, every reading in the order tried)."""
        name = safe_str(rel)
        path = safe_join(root, rel, allow_symlinks=self.config.follow_symlinks)
        if path is None:
            unsafe = NoPrompt("unsafe_path", f"{name!r} is not a path inside {root}", "file")
            return None, unsafe, [unsafe]
        problem: NoPrompt | None = None
        try:
            data = read_regular(path, self.config.max_file_bytes)
        except OverBound as e:
            refused = NoPrompt(e.reason, f"{name}: {e.detail}", "file")
            return None, refused, [refused]
        except (OSError, ValueError) as e:
            data, problem = None, NoPrompt("no_prompt", f"cannot read {name}: {getattr(e, 'strerror', None) or e}")
        readings = metadata.examine(data, bare_comments=self.config.bare_comments) if data else []
        if not any(isinstance(r, PromptInfo) for r in readings):
            readings += self._sidecars(root, rel)
        found = metadata.decide(readings)
        if data is None and not isinstance(found, PromptInfo):
            found = problem
        return data, found, readings

    def _base(self, rel: str, data: bytes) -> Row:
        # the path is part of the id, so byte-identical files at two paths stay two rows (dedup decides)
        return {"id": f"{SOURCE}:{hex_id(rel, data)}", "source": SOURCE, "source_id": safe_str(rel)}

    def _sidecars(self, root: Path, rel: str) -> list[Reading]:
        stem = rel[: len(rel) - len(Path(rel).suffix)]
        out: list[Reading] = []
        for ext in SIDECARS:
            path = safe_join(root, f"{stem}.{ext}", allow_symlinks=self.config.follow_symlinks)
            if path is None:
                continue
            sidecar = safe_str(f"{stem}.{ext}")
            try:
                text = read_regular(path, MAX_SIDECAR_BYTES).decode("utf-8", "replace")
                found = metadata.read_sidecar(text, ext, sidecar)
            except OverBound as e:
                if e.reason == "not_a_regular_file":
                    continue
                reason = "metadata_too_large" if e.reason == "file_too_large" else e.reason
                found = NoPrompt(reason, e.detail if sidecar in e.detail else f"{sidecar}: {e.detail}",
                                 f"sidecar:{ext}")
            except OSError:  # missing or unreadable: no sidecar
                continue
            if found is not None:
                out.append(found)
                if isinstance(found, PromptInfo):
                    break
        return out


def _summary(found: Reading) -> dict[str, Any]:
    meta = {k: v for k, v in found.gen_meta.items() if k != "source_meta"}
    if isinstance(found, PromptInfo):
        return {"origin": found.origin, "reader": found.reader, "prompt": found.prompt,
                "negative_prompt": found.negative_prompt, "gen_meta": meta}
    return {"origin": found.origin, "reader": found.reader, "reason": found.reason, "detail": found.detail,
            "gen_meta": meta}


def explain(paths: Iterable[str | Path], *, bare_comments: bool = False) -> list[dict[str, Any]]:
    """For each image file: every reader that found something, and the row it makes (prompt, or drop reason)."""
    out: list[dict[str, Any]] = []
    for raw in paths:
        path = Path(raw).expanduser().absolute()
        source = FolderSource(FolderConfig(path=path.parent, bare_comments=bare_comments))
        _, found, readings = source.examine(path.parent, path.name)
        entry: dict[str, Any] = {"file": str(raw), "readings": [_summary(r) for r in readings]}
        if isinstance(found, PromptInfo):
            entry["row"] = "kept"
            entry.update(_summary(found))
        else:
            entry["row"] = "dropped"
            entry["reason"] = found.reason if found is not None else "no_prompt"
            entry["detail"] = found.detail if found is not None else "no embedded metadata and no .json/.txt sidecar"
        out.append(entry)
    return out


def explain_text(entries: list[dict[str, Any]]) -> str:
    """`explain`'s answer as lines for a terminal."""
    lines: list[str] = []
    for entry in entries:
        lines.append(f"{entry['file']}: {entry['row']}" + (f" ({entry['reason']})" if entry["row"] == "dropped"
                                                            else f" from {entry['origin']} [{entry['reader']}]"))
        for found in entry["readings"]:
            what = f"prompt {found['prompt'][:80]!r}" if "prompt" in found else f"{found['reason']}: {found['detail']}"
            lines.append(f"  {found['origin'] or '-'} [{found['reader'] or '-'}]: {what}")
        if entry["row"] == "kept":
            if entry.get("negative_prompt"):
                lines.append(f"  negative: {entry['negative_prompt'][:80]!r}")
            if entry.get("gen_meta"):
                lines.append("  gen_meta: " + ", ".join(f"{k}={v}" for k, v in entry["gen_meta"].items()))
        elif not entry["readings"]:
            lines.append(f"  {entry['detail']}")
    return "\n".join(lines)
