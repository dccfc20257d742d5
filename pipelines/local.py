"""The local executor: a stage shard by shard in this process, or in N spawned worker processes.

For each input shard `<prev>/<rel>.parquet` it writes `<stage>/<rel>.parquet`, `dropped/<rel>.parquet`,
`_stats/<rel>.json` and, last, the marker `_done/<rel>` (see `pipelines.executor`). A rerun skips shards whose
marker exists, so a run killed at any moment resumes with nothing lost and nothing duplicated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.executor import open_stage, run_job


def run_stage(
    run_dir: Path, name: str, config: Any, *, workers: int = 1, progress: bool = True, source: str | None = None
) -> dict[str, Any]:
    """Run one processing stage over its input stage's shards (`source`, default: the latest finished one before
    it); returns the stage's total stats. A stage finished with the same fingerprint is left as it is."""
    job = open_stage(run_dir, name, config, source=source, progress=progress)
    run_job(job, workers=workers, progress=progress)
    return job.close()
