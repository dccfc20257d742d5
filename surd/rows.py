"""The per-row processing contract shared by every stage's logic.

A *processor* holds a stage's row logic and nothing else (no I/O, no counting):

- `process_batch(rows: list[dict]) -> list[dict | Drop]` (or `process_row(row) -> dict | Drop`
  for simple stages; `RowProcessor` turns one into the other);
- optional `setup()`: load models once per worker process, called before the first batch;
- optional `plan_columns: tuple[str, ...]` and `plan(index: pyarrow.Table)`: for decisions that need
  the whole input (de-duplication). The executor reads only `plan_columns` of every input shard and
  calls `plan` once, in the parent, before any batch; `plan` must be deterministic in its input.
- optional `on_rows = None` (declare it as a class attribute): for a batch (or plan) that takes long, the
  executor lends the processor a callback there while it runs; `self.on_rows(n)` says n more rows of it are
  finished, and the progress bar moves inside the batch. Rows not reported are counted when the batch ends.

Rows are plain dicts keyed by SURD column names (`surd.schema`); `image` is `{"bytes", "path"}`.
`pipelines.executor.Stage` wraps a processor into the executor's Table -> (kept, dropped) contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Drop:
    """Why a row was dropped: a machine-readable `reason` and an optional human `detail`."""

    reason: str
    detail: str = ""
    row: dict[str, Any] | None = None  # the (possibly updated) row to record; defaults to the input row


class RowProcessor:
    """Base for processors whose logic is one row at a time."""

    def setup(self) -> None:
        pass

    def process_row(self, row: dict[str, Any]) -> dict[str, Any] | Drop:
        raise NotImplementedError

    def process_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        return [self.process_row(row) for row in rows]


class StageConfig(BaseModel):
    """Base for a stage's recipe section. Unknown keys are errors that name the key."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(64, ge=1, description="rows per call of process_batch")
    num_cpus: float = Field(1.0, gt=0, description="per worker/actor (Ray executor)")
    num_gpus: float = Field(0.0, ge=0, description="per actor (Ray executor)")

    def build(self) -> Any:
        """Return the processor (see module doc) configured by this section."""
        raise NotImplementedError
