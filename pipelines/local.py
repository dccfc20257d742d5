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
    run_dir: Path, name: str, config: Any, *, workers: int = 1, progress: bool = True
) -> dict[str, Any]:
    """Run one processing stage over the previous stage's shards; returns the stage's total stats."""
    job = open_stage(run_dir, name, config, progress=progress)
    run_job(job, workers=workers, progress=progress)
    return job.close()
