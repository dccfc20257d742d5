"""The Stage contract: a named processor that turns a Table batch into (kept, dropped) Tables.

Stages are pure with respect to storage (executors own all I/O). The processor holds the row logic
(see `surd.rows`); this wrapper converts between Arrow and row dicts, records drops with their stage
and reason, and reports the processor's counters per shard.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from surd.rows import Drop
from surd.schema import DROPPED_SCHEMA, SCHEMA, from_rows


class Stage:
    def __init__(self, name: str, processor: Any, batch_size: int = 64) -> None:
        self.name = name
        self.processor = processor
        self.batch_size = batch_size
        self._ready = False

    @property
    def plan_columns(self) -> tuple[str, ...]:
        return tuple(getattr(self.processor, "plan_columns", ()))

    def plan(self, index: Any) -> None:
        """Whole-input decisions, made once in the parent before any batch (e.g. de-duplication)."""
        self.processor.plan(index)

    def setup(self) -> None:
        """Load models once per worker; idempotent."""
        if not self._ready:
            if hasattr(self.processor, "setup"):
                self.processor.setup()
            self._ready = True

    def take_side_tables(self) -> dict[str, pa.Table]:
        """Side outputs the processor produced since the last call (e.g. embeddings), by name."""
        take = getattr(self.processor, "take_side_tables", None)
        return dict(take()) if take is not None else {}

    def counters(self) -> dict[str, int]:
        return dict(getattr(self.processor, "counters", {}) or {})

    def __call__(self, batch: pa.Table) -> tuple[pa.Table, pa.Table]:
        self.setup()
        rows = batch.to_pylist()
        results = self.processor.process_batch(rows)
        if len(results) != len(rows):
            raise RuntimeError(f"stage {self.name}: processor returned {len(results)} results for {len(rows)} rows")
        kept: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, Drop):
                record = dict(result.row if result.row is not None else row)
                record.update(drop_stage=self.name, drop_reason=result.reason, drop_detail=result.detail or None)
                dropped.append(record)
            else:
                kept.append(result)
        return from_rows(kept, SCHEMA), from_rows(dropped, DROPPED_SCHEMA)
