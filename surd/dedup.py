"""The dedup stage: exact (sha256) and perceptual (pHash) de-duplication, keeping the first row in `id` order.

The decision needs the whole input, so the processor plans once over the plan columns of every input row
(the executor calls `plan`) and `process_batch` only applies the decisions. `clean` fills sha256 and phash.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from surd.errors import StageError
from surd.phash import NearIndex
from surd.rows import Drop, StageConfig


class DedupConfig(StageConfig):
    """Recipe section `dedup:`."""

    phash_threshold: int = Field(
        6, ge=0, le=32, description="max phash Hamming distance of a near-duplicate image; 0 disables"
    )

    def build(self) -> Deduplicator:
        return Deduplicator(self)


class Deduplicator:
    """Drops exact and near-duplicate images, keeping the first row in `id` order.

    `plan` sees the plan columns of every input row and decides; `process_batch` applies the decisions.
    Rows without a sha256 (never cleaned) are kept; rows without a phash skip the near-duplicate test.
    """

    # source_id breaks ties between rows that share an id (e.g. identical files collected twice)
    plan_columns = ("id", "source_id", "sha256", "phash", "keyword_prompt")

    def __init__(self, config: DedupConfig) -> None:
        self.config = config
        self._drops: dict[tuple[str, str | None], tuple[str, str]] | None = None

    def plan(self, index: pa.Table) -> None:
        self._drops = plan_dedup(
            index.column("id").to_pylist(),
            index.column("source_id").to_pylist() if "source_id" in index.column_names else [None] * len(index),
            index.column("sha256").to_pylist(),
            index.column("phash").to_pylist(),
            index.column("keyword_prompt").to_pylist(),
            self.config.phash_threshold,
        )

    def process_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        if self._drops is None:
            raise StageError("dedup: plan() must run over the whole input before process_batch()")
        results: list[dict[str, Any] | Drop] = []
        for row in rows:
            decision = self._drops.get((row["id"], row.get("source_id")))
            results.append(row if decision is None else Drop(*decision))
        return results


def plan_dedup(
    ids: list[str],
    source_ids: list[str | None],
    sha256s: list[str | None],
    phashes: list[int | None],
    prompts: list[str | None],
    threshold: int,
) -> dict[tuple[str, str | None], tuple[str, str]]:
    """Decide which rows are duplicates: {(id, source_id): (reason, id of the kept row)}."""
    order = sorted(range(len(ids)), key=lambda i: (ids[i], source_ids[i] or ""))
    kept_by_sha: dict[str, tuple[str, str | None]] = {}  # sha256 -> (kept id, its prompt)
    near = NearIndex(threshold, expected_size=sum(v is not None for v in phashes)) if threshold > 0 else None
    near_ids: list[str] = []  # NearIndex position -> kept id
    drops: dict[tuple[str, str | None], tuple[str, str]] = {}
    seen: set[tuple[str, str | None]] = set()
    for i in order:
        key, sha, value = (ids[i], source_ids[i]), sha256s[i], phashes[i]
        if sha is None or key in seen:
            continue  # rows that share (id, source_id) cannot be told apart: they share the first one's fate
        seen.add(key)
        if sha in kept_by_sha:
            kept_id, kept_prompt = kept_by_sha[sha]
            drops[key] = ("duplicate_pair" if prompts[i] == kept_prompt else "duplicate_image", kept_id)
            continue
        if near is not None and value is not None:
            pos = near.first_within(value)
            if pos is not None:
                drops[key] = ("near_duplicate_image", near_ids[pos])
                continue
        kept_by_sha[sha] = (ids[i], prompts[i])
        if near is not None and value is not None:
            near.add(value)
            near_ids.append(ids[i])
    return drops
