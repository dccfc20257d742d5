"""The `folder` source: a folder (recursive) of generated images with their prompts embedded or in sidecars.

Prompts come from `surd.sources.metadata`: embedded metadata first (A1111/Forge PNG `parameters`, ComfyUI
`prompt`/`workflow`, EXIF UserComment, JPEG comments), then `<stem>.json`, then `<stem>.txt`.
Listing reads names only; reading a partition reads each file's bytes and parses chunk headers, never pixels
(the clean stage decodes). Hidden files and folders (`.name`) are skipped, and so are symlinks unless
`follow_symlinks` is set, and then only those that stay inside the folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field

from surd.errors import SourceError
from surd.rows import Drop
from surd.sources import metadata
from surd.sources.base import Row, SourceConfig
from surd.sources.genmeta import safe_str
from surd.sources.localfiles import hex_id, prompt_columns, read_small, safe_join

SOURCE = "folder"


class FolderConfig(SourceConfig):
    """`collect: [{type: folder, path: ./images}]`"""

    type: Literal["folder"] = "folder"
    path: Path = Field(description="the folder to scan, recursively")
    extensions: list[str] = Field(
        default_factory=lambda: ["png", "jpg", "jpeg", "webp"], description="image file extensions (any case)"
    )
    follow_symlinks: bool = Field(False, description="follow symlinks that stay inside the folder")
    max_file_bytes: int = Field(256 << 20, ge=1, description="larger files are dropped (file_too_large)")

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
        name = safe_str(rel)  # for messages: file names need not be UTF-8
        path = safe_join(root, rel, allow_symlinks=self.config.follow_symlinks)
        if path is None:
            return Drop("unsafe_path", f"{name!r} is not a path inside {root}", row=self._base(rel, b""))
        data: bytes | None = None
        problem = ""
        try:
            size = path.stat().st_size
            if size > self.config.max_file_bytes:
                return Drop("file_too_large", f"{name}: {size} bytes", row=self._base(rel, b""))
            data = path.read_bytes()
        except (OSError, ValueError) as e:
            problem = f"cannot read {name}: {getattr(e, 'strerror', None) or e}"
        info = metadata.read_embedded(data) if data else None
        if info is None or not info.prompt.strip():
            info = self._sidecar(root, rel)
        row = self._base(rel, data or b"")
        row["image"] = {"bytes": data, "path": row["source_id"]}
        if info is None:
            return Drop("no_prompt", problem or f"{name}: no embedded prompt and no .json/.txt sidecar", row=row)
        row.update(prompt_columns(info))
        return row

    def _base(self, rel: str, data: bytes) -> Row:
        # the path is part of the id, so byte-identical files at two paths stay two rows (dedup decides)
        return {"id": f"{SOURCE}:{hex_id(rel, data)}", "source": SOURCE, "source_id": safe_str(rel)}

    def _sidecar(self, root: Path, rel: str) -> metadata.PromptInfo | None:
        stem = rel[: len(rel) - len(Path(rel).suffix)]
        for ext, parse in ((".json", metadata.read_sidecar_json), (".txt", metadata.read_sidecar_txt)):
            path = safe_join(root, stem + ext, allow_symlinks=self.config.follow_symlinks)
            text = read_small(path) if path is not None else None
            info = parse(text) if text else None
            if info is not None:
                return info
        return None
