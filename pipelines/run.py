"""Run a whole recipe with the local executor: collect -> processing stages -> export."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from pipelines.collect import collect
from pipelines.export import export
from pipelines.local import run_stage
from pipelines.recipe import Recipe
from surd.errors import RecipeError
from surd.layout import STAGES


def check_until(until: str | None) -> None:
    if until is not None and until not in STAGES:
        raise RecipeError(f"--until {until!r}: not a stage; stages are {', '.join(STAGES)}")


def run_recipe(
    recipe: Recipe, out: Path, *, workers: int = 1, until: str | None = None, reviews: Any = None,
    progress: bool = True, stage_runner: Callable[..., dict[str, Any]] | None = None,
) -> list[str]:
    """Run the recipe's stages into `out`; returns the names of the stages that ran.

    `stage_runner(run_dir, name, config, progress=...)` runs one processing stage (default: the local
    executor with `workers` processes); collect and export always run here.
    """
    runner = stage_runner or partial(run_stage, workers=workers)
    check_until(until)
    last = STAGES.index(until) if until else len(STAGES)
    for source in recipe.sources():
        collect(out, source, workers=workers, progress=progress)
    ran = ["collect"]
    for name, config in recipe.stages():
        if STAGES.index(name) > last:
            return ran
        runner(out, name, config, progress=progress)
        ran.append(name)
    if STAGES.index("export") <= last:
        export(out, recipe.export, reviews=reviews, recipe_name=recipe.name, progress=progress)
        ran.append("export")
    return ran
