"""Source contracts. A source turns something outside (a folder, a file, an API) into SURD rows.

Two kinds, both run by `pipelines.collect`:

- `PartitionedSource`: knows its whole input up front (a folder, a Parquet file, DiffusionDB parts).
  `list_partitions()` is called once; the executor persists the list (`_listing.json`) so a rerun
  sees the same partitions even if files were added. Each partition becomes one shard
  `collect/<source name>/part-NNNNN.parquet`, so partitions run in parallel and resume by marker.
- `CursorSource`: pages through an API. `pages(cursor)` yields `Page`s; the executor writes each
  page's rows as one shard, then persists `next_cursor`, so a restart continues after the last page.

Rows are dicts keyed by SURD column names; a row that cannot be used is a `surd.rows.Drop` with a
reason (the executor records it in `dropped/`). Ids must be stable across runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from surd.rows import Drop

Row = dict[str, Any]

# A source name is one plain folder name under collect/ (and in every stage after it): never a path, never
# hidden, never one of a stage folder's own sub-folders (`dropped`, `_stats`, `_done`, ...).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RESERVED_NAMES = frozenset({"dropped"})


@runtime_checkable
class PartitionedSource(Protocol):
    name: str

    def list_partitions(self) -> list[Any]:
        """JSON-serialisable partition descriptors, in a stable order."""
        ...

    def read_partition(self, partition: Any) -> Iterator[Row | Drop]: ...


@dataclass
class Page:
    rows: list[Row | Drop]
    next_cursor: str | None  # None: this was the last page
    raw: bytes | None = None  # the page as received, kept gzipped beside the shard
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class CursorSource(Protocol):
    name: str

    def pages(self, cursor: str | None) -> Iterator[Page]:
        """Pages starting at `cursor` (None: the beginning)."""
        ...


class SourceConfig(BaseModel):
    """Base for one `collect:` entry. Subclasses add `type: Literal[...]` and their options."""

    model_config = ConfigDict(extra="forbid")

    # Options that only bound or pace a run (not what rows it yields): they may change when a run resumes.
    RUN_OPTIONS: ClassVar[frozenset[str]] = frozenset({"max_items"})
    # At least one of these options must be given (not null, not empty); `surd collect TYPE --help` says so.
    ONE_OF: ClassVar[tuple[str, ...]] = ()

    type: str
    name: str | None = Field(None, description="subfolder under collect/ (a plain folder name); defaults to the type")
    rows_per_shard: int = Field(500, ge=1, description="rows per collect shard")

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, name: str | None) -> str | None:
        if name is not None and (not _PLAIN_NAME.fullmatch(name) or name in _RESERVED_NAMES):
            raise ValueError(f"source name {name!r} is not a plain folder name (1-64 letters, digits, '.', '_', '-', "
                             f"starting with a letter or digit; not {', '.join(sorted(_RESERVED_NAMES))})")
        return name

    @model_validator(mode="after")
    def _one_of(self) -> SourceConfig:
        if self.ONE_OF and all(getattr(self, key) in (None, "", [], {}) for key in self.ONE_OF):
            raise ValueError(f"{self.type} source: set {' or '.join(self.ONE_OF)}")
        return self

    @property
    def folder(self) -> str:
        return self.name or self.type

    def build(self) -> PartitionedSource | CursorSource:
        raise NotImplementedError
