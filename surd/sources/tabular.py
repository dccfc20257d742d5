"""The `parquet` and `jsonl` sources: tables of prompts with an image path, image bytes or an image URL.

    collect:
      - {type: parquet, path: prompts.parquet, prompt_column: prompt, image_url_column: url}
      - {type: jsonl, path: data/, image_column: file}     # a folder: every *.jsonl under it

An image column may hold a path (relative to the table file's folder; absolute paths, `..` and symlinks
leading outside are refused as `unsafe_path`), an http(s) URL, raw bytes, or an HF `{"bytes", "path"}`
struct (FIFOs, devices and sockets are refused as `not_a_regular_file`, files over 256 MiB as `file_too_large`).
URLs go to `image_url` for the fetch stage. A JSON line over the bounds of `surd.sources.bounds` is dropped
(`metadata_too_large`, `json_too_deep`). Other scalar columns go into `gen_meta` unless
`meta_columns` names the ones to keep.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from surd.errors import SourceError
from surd.rows import Drop
from surd.sources.base import Row, SourceConfig
from surd.sources.bounds import OverBound
from surd.sources.genmeta import clean_text, safe_str
from surd.sources.localfiles import (
    is_url,
    json_line,
    line_partitions,
    meta_json,
    read_image_file,
    read_lines,
    safe_join,
)


class TabularConfig(SourceConfig):
    ONE_OF: ClassVar[tuple[str, ...]] = ("image_column", "image_url_column")

    path: Path = Field(description="a table file, or a folder searched recursively for them")
    prompt_column: str = Field("prompt", description="the column holding the keyword prompt")
    negative_prompt_column: str | None = Field(None, description="the column holding a negative prompt, if any")
    narrative_column: str | None = Field(None, description="a simple narrative prompt, if the table has one")
    image_column: str | None = Field(None, description="image path (relative to the file), bytes or URL")
    image_url_column: str | None = Field(None, description="image URL, fetched by the fetch stage")
    id_column: str | None = Field(None, description="a stable id; default: <file>:<row>")
    meta_columns: list[str] | None = Field(None, description="columns kept in gen_meta; default: other scalars")

    def build(self) -> TableSource:
        return TableSource(self)


class ParquetConfig(TabularConfig):
    """`collect: [{type: parquet, path: ..., prompt_column: ..., image_column | image_url_column: ...}]`"""

    type: Literal["parquet"] = "parquet"


class JsonlConfig(TabularConfig):
    """`collect: [{type: jsonl, path: ..., prompt_column: ..., image_column | image_url_column: ...}]`"""

    type: Literal["jsonl"] = "jsonl"


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _value_type(typ: pa.DataType) -> pa.DataType:
    # A dictionary-encoded column (pandas' `category`) holds plain values too: judge it by its value type.
    return typ.value_type if pa.types.is_dictionary(typ) else typ


class TableSource:
    """A `PartitionedSource` over Parquet row ranges or JSON-lines line ranges."""

    def __init__(self, config: TabularConfig) -> None:
        self.config = config
        self.name = config.folder
        self.kind = config.type
        self.used = {
            c
            for c in (config.prompt_column, config.negative_prompt_column, config.narrative_column,
                      config.image_column, config.image_url_column, config.id_column)
            if c
        }

    def _files(self) -> tuple[Path, list[str]]:
        path = Path(self.config.path).expanduser()
        if path.is_file():
            path = path.resolve()
            return path.parent, [path.name]
        if not path.is_dir():
            raise SourceError(f"{self.kind} source: {self.config.path} does not exist")
        root = path.resolve()
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob(f"*.{self.kind}") if p.is_file())
        if not files:
            raise SourceError(f"{self.kind} source: no *.{self.kind} files under {self.config.path}")
        return root, files

    def list_partitions(self) -> list[dict[str, Any]]:
        root, files = self._files()
        n = self.config.rows_per_shard
        parts: list[dict[str, Any]] = []
        for rel in files:
            if self.kind == "jsonl":
                parts += line_partitions(root / rel, rel, n)
                continue
            try:
                pf = pq.ParquetFile(root / rel)
            except (OSError, pa.ArrowException) as e:
                raise SourceError(f"parquet source: cannot read {root / rel}: {e}") from None
            names, rows = set(pf.schema_arrow.names), pf.metadata.num_rows
            missing = sorted(c for c in self.used if c not in names)
            if missing:
                raise SourceError(f"parquet source: {root / rel} has no column(s) {missing}; it has {sorted(names)}")
            parts += [{"file": rel, "start": i, "stop": min(i + n, rows)} for i in range(0, rows, n)]
        return parts

    def read_partition(self, partition: dict[str, Any]) -> Iterator[Row | Drop]:
        root, _ = self._files()
        path = safe_join(root, partition["file"])
        if path is None:
            raise SourceError(f"{self.kind} source: listed file {partition['file']!r} is outside {root}")
        if self.kind == "jsonl":
            for number, line in read_lines(path, partition):
                where = f"{partition['file']}:{number}"
                bad = {"id": f"jsonl:{where}", "source": "jsonl"}
                try:
                    record, problem = json_line(line, where), "not a JSON object"
                except OverBound as e:
                    yield Drop(e.reason, e.detail, row=bad)
                    continue
                except ValueError as e:
                    record, problem = None, str(e)
                if isinstance(record, dict):
                    yield self.read_record(record, path.parent, where)
                else:
                    yield Drop("bad_json_line", f"{where}: {problem}", row=bad)
            return
        for index, record in self._parquet_rows(path, partition["start"], partition["stop"]):
            yield self.read_record(record, path.parent, f"{partition['file']}:{index}")

    def _parquet_rows(self, path: Path, start: int, stop: int) -> Iterator[tuple[int, dict[str, Any]]]:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        meta = self.config.meta_columns
        scalar_types = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating,
                        pa.types.is_boolean, pa.types.is_timestamp)
        columns = [
            f.name for f in schema
            if f.name in self.used or (f.name in meta if meta is not None else any(t(_value_type(f.type))
                                                                                   for t in scalar_types))
        ]
        offset = 0
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if offset + rows > start and offset < stop:
                table = pf.read_row_group(group, columns=columns)
                lo, hi = max(start - offset, 0), min(stop - offset, rows)
                for i, record in enumerate(table.slice(lo, hi - lo).to_pylist()):
                    yield offset + lo + i, record
            offset += rows

    def read_record(self, record: dict[str, Any], folder: Path, where: str) -> Row | Drop:
        """One table row as a SURD row (or a Drop); `where` is `<file>:<row or line>`."""
        c = self.config
        ident = record.get(c.id_column) if c.id_column else None
        source_id = safe_str(str(ident) if ident is not None and ident != "" else where)
        row: Row = {"id": f"{self.kind}:{source_id}", "source": self.kind, "source_id": source_id}
        prompt = clean_text(record.get(c.prompt_column))
        if prompt is None:
            return Drop("no_prompt", f"{where}: no {c.prompt_column!r}", row=row)
        image, url, problem = self._image(record, folder, where)
        if problem is not None:
            return Drop(*problem, row=row)
        if image is None and url is None:
            return Drop("no_image", f"{where}: neither an image nor an image URL", row=row)
        narrative = clean_text(record.get(c.narrative_column)) if c.narrative_column else None
        narrative = narrative.strip() if narrative else None
        negative = clean_text(record.get(c.negative_prompt_column)) if c.negative_prompt_column else None
        keep = c.meta_columns if c.meta_columns is not None else [k for k in record if k not in self.used]
        row.update(
            image=image,
            image_url=url,
            keyword_prompt_raw=prompt,
            negative_prompt=negative,
            narrative_prompt=narrative,
            narrative_origin="source" if narrative else None,
            gen_meta=meta_json({k: record[k] for k in keep if k in record and _scalar(record[k])}),
        )
        return row

    def _image(
        self, record: dict[str, Any], folder: Path, where: str
    ) -> tuple[dict[str, Any] | None, str | None, tuple[str, str] | None]:
        """(image struct, image URL, drop (reason, detail)) from the image and URL columns."""
        c = self.config
        url = record.get(c.image_url_column) if c.image_url_column else None
        if url is not None and not (isinstance(url, str) and is_url(url)):
            return None, None, ("bad_url", f"{where}: {c.image_url_column} {str(url)[:200]!r} is not an http(s) URL")
        value = record.get(c.image_column) if c.image_column else None
        if isinstance(value, dict):
            if value.get("bytes"):
                return {"bytes": value["bytes"], "path": value.get("path")}, url, None
            value = value.get("path")
        if isinstance(value, bytes) and value:
            return {"bytes": value, "path": None}, url, None
        if not isinstance(value, str) or not value:
            return None, url, None
        if is_url(value):
            return None, url or value, None
        if "://" in value:
            return None, None, ("bad_url", f"{where}: {value[:200]!r} is not an http(s) URL")
        path = safe_join(folder, value)
        if path is None:
            return None, None, ("unsafe_path", f"{where}: {value!r} is not a path inside {folder}")
        try:
            data = read_image_file(path)
        except OverBound as e:
            return None, None, (e.reason, f"{where}: {safe_str(value)}: {e.detail}")
        except (OSError, ValueError) as e:
            return None, None, ("missing_file", f"{where}: {safe_str(value)}: {getattr(e, 'strerror', None) or e}")
        return {"bytes": data, "path": safe_str(value.replace("\\", "/"))}, url, None
