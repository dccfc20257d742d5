"""The `imagefolder` source: the original SURD release layout (and the one `surd export --format imagefolder` writes).

    SURD/
      metadata.jsonl    {"file_name": "0001.png", "text": "<simple narrative prompt>", "prompt": "<keyword prompt>"}
      0001.png ...

`metadata.jsonl` files in subfolders (`train/`, `test/`, as in the HF imagefolder layout) are read too, each
relative to its own folder. `file_name` must be a relative path inside that folder: absolute paths, `..` and
symlinks leading outside are refused (`unsafe_path`) and never opened; so are FIFOs, devices and sockets
(`not_a_regular_file`) and files over 256 MiB (`file_too_large`). A line over `MAX_LINE_BYTES` or nested deeper
than `MAX_JSON_DEPTH` is dropped (`metadata_too_large`, `json_too_deep`; see `surd.sources.bounds`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from surd.errors import SourceError
from surd.rows import Drop
from surd.sources.base import Row, SourceConfig
from surd.sources.bounds import OverBound
from surd.sources.genmeta import clean_text, safe_str
from surd.sources.localfiles import json_line, line_partitions, meta_json, read_image_file, read_lines, safe_join

SOURCE = "imagefolder"
METADATA = "metadata.jsonl"


class ImageFolderConfig(SourceConfig):
    """`collect: [{type: imagefolder, path: ./SURD}]`"""

    type: Literal["imagefolder"] = "imagefolder"
    path: Path = Field(description="the folder holding metadata.jsonl and the images")

    def build(self) -> ImageFolderSource:
        return ImageFolderSource(self)


def _metadata_files(root: Path) -> list[str]:
    """Relative paths of every metadata.jsonl under root (not following symlinks), sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if METADATA in files and not (Path(folder) / METADATA).is_symlink():
            found.append((Path(folder) / METADATA).relative_to(root).as_posix())
    return sorted(found)


class ImageFolderSource:
    """A `PartitionedSource` over an imagefolder layout: partitions are line ranges of metadata.jsonl files."""

    def __init__(self, config: ImageFolderConfig) -> None:
        self.config = config
        self.name = config.folder

    def _root(self) -> Path:
        root = Path(self.config.path).expanduser()
        if not root.is_dir():
            raise SourceError(f"imagefolder source: {self.config.path} is not a folder")
        return root.resolve()

    def list_partitions(self) -> list[dict[str, Any]]:
        root = self._root()
        files = _metadata_files(root)
        if not files:
            raise SourceError(f"imagefolder source: no {METADATA} in {self.config.path}")
        parts: list[dict[str, Any]] = []
        for rel in files:
            parts += line_partitions(root / rel, rel, self.config.rows_per_shard)
        return parts

    def read_partition(self, partition: dict[str, Any]) -> Iterator[Row | Drop]:
        root = self._root()
        meta_path = safe_join(root, partition["file"], allow_symlinks=False)
        if meta_path is None:
            raise SourceError(f"imagefolder source: listed metadata file {partition['file']!r} is outside {root}")
        folder = meta_path.parent
        prefix = Path(partition["file"]).parent.as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        for number, line in read_lines(meta_path, partition):
            yield self.read_line(folder, prefix, f"{partition['file']} line {number}", line)

    def read_line(self, folder: Path, prefix: str, where: str, line: str | None) -> Row | Drop:
        """One metadata line as a row (or a Drop with the reason); `where` names the file and line."""
        bad = {"id": f"{SOURCE}:{where}", "source": SOURCE}
        try:
            record = json_line(line, where)
        except OverBound as e:
            return Drop(e.reason, e.detail, row=bad)
        except ValueError as e:
            return Drop("bad_metadata_line", f"{where}: {e}", row=bad)
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            return Drop("bad_metadata_line", f"{where}: not an object with a string file_name", row=bad)
        name = record["file_name"]
        rel = safe_str(prefix + name.replace("\\", "/"))
        row: Row = {"id": f"{SOURCE}:{rel}", "source": SOURCE, "source_id": rel}
        path = safe_join(folder, name)
        if path is None:
            return Drop("unsafe_path", f"{where}: file_name {rel!r} is not a path inside the folder", row=row)
        prompt = clean_text(record.get("prompt"))
        if prompt is None:
            return Drop("no_prompt", f"{where}: no 'prompt'", row=row)
        try:
            data = read_image_file(path)
        except OverBound as e:
            return Drop(e.reason, f"{where}: {rel}: {e.detail}", row=row)
        except (OSError, ValueError) as e:
            return Drop("missing_file", f"{where}: {rel}: {getattr(e, 'strerror', None) or e}", row=row)
        narrative = clean_text(record.get("text"))
        narrative = narrative.strip() if narrative else None
        negative = clean_text(record.get("negative_prompt"))
        extra = {k: v for k, v in record.items() if k not in ("file_name", "text", "prompt", "negative_prompt")}
        row.update(
            image={"bytes": data, "path": rel},
            keyword_prompt_raw=prompt,
            negative_prompt=negative,
            narrative_prompt=narrative,
            narrative_origin="source" if narrative else None,
            gen_meta=meta_json(extra),
        )
        return row
