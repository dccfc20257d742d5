"""Run a whole recipe with the local executor: collect -> processing stages -> export.

Each stage reads the one before it in the recipe. Stage folders and sources the recipe no longer has are removed
first (their rows would otherwise flow on); `rebuild_from` removes a stage and every later one. Then every stage
runs; one finished with the same fingerprint is left as it is (`pipelines.fingerprint`), and a run with nothing to
do says so in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from pipelines.collect import collect, discard_collect, prune_sources
from pipelines.executor import discard, invalidate, remove_trash
from pipelines.export import export
from pipelines.local import run_stage
from pipelines.plan import nothing_to_do, plan_run
from pipelines.progress import notice
from pipelines.recipe import Recipe
from pipelines.registry import PROCESSING_STAGES
from surd import layout
from surd.errors import RecipeError
from surd.layout import STAGES


def check_until(until: str | None, flag: str = "--until") -> None:
    if until is not None and until not in STAGES:
        raise RecipeError(f"{flag} {until!r}: not a stage; stages are {', '.join(STAGES)}")


def run_recipe(
    recipe: Recipe, out: Path, *, workers: int = 1, until: str | None = None, reviews: Any = None,
    progress: bool = True, stage_runner: Callable[..., dict[str, Any]] | None = None,
    rebuild_from: str | None = None,
) -> list[str]:
    """Run the recipe's stages into `out`; returns the names of the stages the run covers.

    `stage_runner(run_dir, name, config, progress=..., source=...)` runs one processing stage (default: the local
    executor with `workers` processes); collect and export always run here.
    """
    out = Path(out)
    runner = stage_runner or partial(run_stage, workers=workers)
    check_until(until)
    check_until(rebuild_from, "--from")
    last = STAGES.index(until) if until else len(STAGES)
    covered = ["collect", *(n for n, _ in recipe.stages() if STAGES.index(n) <= last)]
    covered += ["export"] if STAGES.index("export") <= last else []
    remove_trash(out)
    if rebuild_from is None and nothing_to_do(plan_run(recipe, out, until=until, reviews=reviews)):
        notice(f"nothing to do: {out} is up to date with the recipe ({', '.join(covered)})")
        return covered
    _forget(recipe, out, rebuild_from)
    sources = recipe.sources()
    prune_sources(out, [config.folder for config in sources])
    for source in sources:
        collect(out, source, workers=workers, progress=progress)
    previous = "collect"
    for name, config in recipe.stages():
        if STAGES.index(name) > last:
            return covered
        runner(out, name, config, progress=progress, source=previous)
        previous = name
    if STAGES.index("export") <= last:
        export(out, recipe.export, reviews=reviews, recipe_name=recipe.name, progress=progress, source=previous)
    return covered


def _forget(recipe: Recipe, out: Path, rebuild_from: str | None) -> None:
    """Remove what the run must not reuse: `--from` a stage on, and stages the recipe no longer has."""
    if rebuild_from == "collect":
        present = [s for s in STAGES if layout.stage_dir(out, s).exists()]
        if present:
            notice(f"collect: --from collect; rebuilding {', '.join(present)}")
        invalidate(out, STAGES[1], "--from collect", quiet=True)
        discard_collect(out)
    elif rebuild_from is not None:
        invalidate(out, rebuild_from, f"--from {rebuild_from}")
    wanted = {name for name, _ in recipe.stages()}
    for name in PROCESSING_STAGES:
        if name not in wanted and layout.stage_dir(out, name).exists():
            notice(f"{name}: not in the recipe any more; removing {name}/")
            discard(out, layout.stage_dir(out, name))
