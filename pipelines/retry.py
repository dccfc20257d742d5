"""`surd fetch RUN --retry-failed`: the fetch stage's retry pass, as an executor job over fetch's shards.

For each fetch shard whose dropped rows hold transient failures (`surd.fetch.TRANSIENT`): re-fetch them and
commit the shard again (through `pipelines.executor.commit`): the recovered rows appended to its kept rows,
the dropped rows left with what still fails (new reason) plus the untouched final failures, in their original
order. Commit writes the kept shard before the dropped one, and rows already in the kept shard are removed
from the dropped one without a download, so a pass killed between the two writes leaves no duplicate behind.
Stages after fetch that already ran do not see the recovered rows until they are rebuilt: fetch's fingerprint
counts its shards' rows, so the next run rebuilds them (`pipelines.fingerprint`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.executor import Job, commit, run_job
from surd import layout, shards
from surd.errors import StageError
from surd.fetch import TRANSIENT, FetchConfig
from surd.rows import Drop
from surd.schema import COLUMN_NAMES, DROPPED_SCHEMA, SCHEMA, from_rows

STAGE = "fetch"


class RetryJob(Job):
    """Every fetch shard with dropped rows; `run` re-fetches its transient failures and commits it again.

    `totals` counts what this pass did; `retry_failed` runs the job in this process so they add up here.
    """

    def __init__(self, stage_dir: Path, config: FetchConfig) -> None:
        self.out, self.config, self.label = stage_dir, config, "fetch --retry-failed"
        dropped_root = stage_dir / "dropped"
        self.todo = sorted(str(p.relative_to(dropped_root).with_suffix("")) for p in dropped_root.rglob("*.parquet")
                           if not p.name.startswith("."))
        self.totals: Counter[str] = Counter()
        self._fetcher: Any = None

    def setup(self) -> None:
        if self._fetcher is None:
            self._fetcher = self.config.build()
            self._fetcher.setup()

    def run(self, rel: str, on_rows: Any = None) -> dict[str, Any]:
        self.setup()
        start = time.perf_counter()
        dropped = shards.read_table(shards.dropped_path(self.out, rel)).to_pylist()
        kept_file = shards.shard_path(self.out, rel)
        kept = shards.read_table(kept_file).cast(SCHEMA) if kept_file.exists() else SCHEMA.empty_table()
        kept_ids = set(kept.column("id").to_pylist())
        todo = [r for r in dropped if r["id"] not in kept_ids and r["drop_reason"] in TRANSIENT]
        reconciled = sum(r["id"] in kept_ids for r in dropped)
        stats_file = shards.stats_path(self.out, rel)
        previous = (json.loads(stats_file.read_text()) if stats_file.exists()
                    else {"in": kept.num_rows + len(dropped), "seconds": 0.0})
        if not todo and not reconciled:
            return previous
        outcomes: dict[str, dict[str, Any] | Drop] = {}
        for first in range(0, len(todo), self.config.batch_size):
            batch = [{k: r[k] for k in COLUMN_NAMES} for r in todo[first : first + self.config.batch_size]]
            for row, result in zip(batch, self._fetcher.process_batch(batch), strict=True):
                outcomes[row["id"]] = result
        recovered = [r for r in outcomes.values() if not isinstance(r, Drop)]
        remaining = []
        for record in dropped:
            if record["id"] in kept_ids:
                continue  # recovered by an earlier retry that died before rewriting the dropped shard
            result = outcomes.get(record["id"])
            if result is None:
                remaining.append(record)
            elif isinstance(result, Drop):
                remaining.append({**record, "drop_reason": result.reason, "drop_detail": result.detail or None})
        counters = dict(previous.get("counters", {}))
        counters["recovered_on_retry"] = counters.get("recovered_on_retry", 0) + len(recovered)
        self.totals.update(retried=len(todo), recovered=len(recovered), shards=1,
                           still_failing=sum(isinstance(r, Drop) for r in outcomes.values()))
        new_kept = pa.concat_tables([kept, from_rows(recovered, SCHEMA)]) if recovered else kept
        seconds = previous.get("seconds", 0.0) + time.perf_counter() - start
        return commit(self.out, rel, new_kept, from_rows(remaining, DROPPED_SCHEMA), previous["in"], seconds, counters)


def retry_failed(run_dir: Path, config: FetchConfig, progress: bool = False) -> dict[str, Any]:
    """Retry transient fetch failures in place; returns {"retried", "recovered", "still_failing", "shards"}."""
    stage_dir = layout.stage_dir(run_dir, STAGE)
    if not (stage_dir / "dropped").is_dir():
        raise StageError(f"{stage_dir}: no fetch output to retry; run `surd fetch {run_dir}` first")
    job = RetryJob(stage_dir, config)
    run_job(job, progress=progress, unit="shards")
    manifest = shards.read_manifest(stage_dir)
    if manifest is not None:
        shards.write_manifest(stage_dir, STAGE, extra={k: v for k, v in manifest.items() if k == "input_stage"})
    return {key: job.totals[key] for key in ("retried", "recovered", "still_failing", "shards")}
