"""`surd experiment`: a small world in which the adapter's effect can be measured on a CPU.

Rendered shapes with known attributes (`world.py`), said two ways (`prompts.py`: community keyword prompts
and plain narrative prompts in other words), built into a SURD dataset by the real pipeline (`dataset.py`);
a small Stable Diffusion trained here on the keyword prompts only (`base_model.py`), so it follows keywords
and not narratives; a judge that reads the attributes off an image (`judge.py`, also `surd eval`'s
`attributes` scorer); every adapter kind trained by `surd train`, a fine-tune control, and `surd eval`
over floor, ceiling and every arm (`runner.py`); the report with its sanity checks first (`report.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapter.experiment.settings import FULL, QUICK, Settings

WORLDS = ("shapes",)

__all__ = ["FULL", "QUICK", "WORLDS", "Settings", "run"]


def run(exp: Path, settings: Settings, docs: Path | None = None, progress: bool = True,
        log: Any = print) -> dict[str, Any]:
    """Run (or resume) the experiment into `exp` and write its report; returns the report's data."""
    from adapter.experiment.report import write_report
    from adapter.experiment.runner import run_experiment

    outcome = run_experiment(Path(exp), settings, progress=progress, log=log)
    return write_report(Path(exp), outcome, docs=docs)
