"""`surd fetch DIR --retry-failed`: download again the rows the fetch stage dropped for transient reasons.

For each `fetch/dropped/<rel>.parquet` holding transient failures (`surd.fetch.TRANSIENT`): re-fetch
them, append the recovered rows to the kept shard `fetch/<rel>.parquet`, and rewrite the dropped shard
with what still fails (new reason) plus the untouched final failures, in their original order. The kept
shard is written before the dropped one, and rows already in the kept shard are removed from the
dropped one without a download, so a run killed between the two writes leaves no duplicate behind.
Stages after fetch that already ran do not see the recovered rows until they are rebuilt.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from surd import shards
from surd.errors import StageError
from surd.fetch import TRANSIENT, FetchConfig
from surd.rows import Drop
from surd.schema import COLUMN_NAMES, DROPPED_SCHEMA, SCHEMA, from_rows

STAGE = "fetch"


def retry_failed(run_dir: Path, config: FetchConfig) -> dict[str, Any]:
    """Retry transient fetch failures in place; returns {"retried", "recovered", "still_failing", "shards"}."""
    stage_dir = Path(run_dir) / STAGE
    dropped_root = stage_dir / "dropped"
    if not dropped_root.is_dir():
        raise StageError(f"{stage_dir}: no fetch output to retry; run `surd fetch {run_dir}` first")
    fetcher = config.build()
    fetcher.setup()
    totals: Counter[str] = Counter()
    for path in sorted(dropped_root.rglob("*.parquet")):
        if path.name.startswith("."):
            continue
        rel = str(path.relative_to(dropped_root).with_suffix(""))
        counts = _retry_shard(stage_dir, rel, fetcher, config.batch_size)
        totals.update(counts)
        totals["shards"] += 1 if counts["retried"] or counts["reconciled"] else 0
    manifest = shards.read_manifest(stage_dir)
    if manifest is not None:
        shards.write_manifest(stage_dir, STAGE, extra={k: v for k, v in manifest.items() if k == "input_stage"})
    return {key: totals[key] for key in ("retried", "recovered", "still_failing", "shards")}


def _retry_shard(stage_dir: Path, rel: str, fetcher: Any, batch_size: int) -> Counter[str]:
    dropped_file = shards.dropped_path(stage_dir, rel)
    kept_file = shards.shard_path(stage_dir, rel)
    dropped = shards.read_table(dropped_file).to_pylist()
    kept = shards.read_table(kept_file) if kept_file.exists() else SCHEMA.empty_table()
    kept_ids = set(kept.column("id").to_pylist())
    todo = [r for r in dropped if r["id"] not in kept_ids and r["drop_reason"] in TRANSIENT]
    counts: Counter[str] = Counter(retried=len(todo), reconciled=sum(r["id"] in kept_ids for r in dropped))
    if not todo and not counts["reconciled"]:
        return counts
    outcomes: dict[str, dict[str, Any] | Drop] = {}
    for start in range(0, len(todo), batch_size):
        batch = [{k: r[k] for k in COLUMN_NAMES} for r in todo[start : start + batch_size]]
        for row, result in zip(batch, fetcher.process_batch(batch), strict=True):
            outcomes[row["id"]] = result
    recovered = [r for r in outcomes.values() if not isinstance(r, Drop)]
    remaining = []
    for record in dropped:
        if record["id"] in kept_ids:
            continue  # recovered by an earlier retry that died before rewriting this file
        result = outcomes.get(record["id"])
        if result is None:
            remaining.append(record)
        elif isinstance(result, Drop):
            remaining.append({**record, "drop_reason": result.reason, "drop_detail": result.detail or None})
    if recovered:
        shards.write_table(kept_file, pa.concat_tables([kept.cast(SCHEMA), from_rows(recovered, SCHEMA)]))
    shards.write_table(dropped_file, from_rows(remaining, DROPPED_SCHEMA))
    _update_stats(stage_dir, rel, kept.num_rows + len(recovered), remaining, len(recovered))
    counts.update(recovered=len(recovered), still_failing=sum(isinstance(r, Drop) for r in outcomes.values()))
    return counts


def _update_stats(stage_dir: Path, rel: str, kept: int, remaining: list[dict[str, Any]], recovered: int) -> None:
    path = shards.stats_path(stage_dir, rel)
    stats = json.loads(path.read_text()) if path.exists() else {"in": kept + len(remaining), "seconds": 0.0}
    stats["kept"] = kept
    stats["dropped"] = dict(Counter(r["drop_reason"] for r in remaining))
    counters = stats.setdefault("counters", {})
    counters["recovered_on_retry"] = counters.get("recovered_on_retry", 0) + recovered
    shards.atomic_write_json(path, stats)
