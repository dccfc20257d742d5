"""What a run of a recipe would do, without doing it: `surd run --dry-run`, and `run_recipe`'s "nothing to do".

For each source and each stage, in data-flow order: `done` (finished with the same fingerprint), `continue`
(started, same fingerprint), `new`, `rebuild` (with the reason: a setting, its input, `--from`) or `remove` (a
stage or source the recipe no longer has). Once one step will change its output, every later one is rebuilt.
The plan reads the run folder only; the decisions are the ones `pipelines.executor.open_stage` and
`pipelines.collect.collect` make when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import fingerprint
from pipelines.collect import collect_record, source_state
from pipelines.export import STAGE as EXPORT
from pipelines.export import reviews_digest
from pipelines.registry import PROCESSING_STAGES
from surd import layout, shards


@dataclass
class Step:
    what: str  # "collect folder", "clean", "export"
    action: str  # done, continue, new, rebuild, remove
    reason: str = ""

    def line(self) -> str:
        words = {"done": "done", "continue": "will continue", "new": "will run", "rebuild": "will rebuild",
                 "remove": "will be removed"}[self.action]
        return f"{self.what}: {words}" + (f" ({self.reason})" if self.reason else "")


def plan_run(recipe: Any, out: Path, *, until: str | None = None, rebuild_from: str | None = None,
             reviews: Any = None) -> list[Step]:
    """The steps a run of `recipe` into `out` would take (see the module doc); `reviews` as export gets them."""
    run_dir = Path(out)
    last = layout.STAGES.index(until) if until else len(layout.STAGES)
    forced = layout.STAGES.index(rebuild_from) if rebuild_from else len(layout.STAGES)
    steps = _collect_steps(recipe, run_dir, forced == 0)
    changing = any(s.action != "done" for s in steps)
    wanted = {name for name, _ in recipe.stages()}
    steps += [Step(name, "remove", "not in the recipe any more") for name in PROCESSING_STAGES
              if name not in wanted and layout.stage_dir(run_dir, name).exists()]
    previous = "collect"
    sections = [*recipe.stages(), (EXPORT, recipe.export)]
    for name, config in sections:
        if layout.STAGES.index(name) > last:
            break
        folder = layout.stage_dir(run_dir, name)
        if layout.STAGES.index(name) >= forced:
            state = fingerprint.State("rebuild", f"--from {rebuild_from}")
        elif changing:
            state = fingerprint.State("rebuild" if folder.exists() else "new", f"its input {previous} changes first")
        else:
            settings = fingerprint.settings_of(name, config, run_dir)
            if name == EXPORT:
                settings.update(recipe_name=recipe.name, reviews=reviews_digest(reviews))
            record = fingerprint.record(name, settings, fingerprint.input_of(run_dir, previous))
            inputs = len(shards.shard_names(layout.stage_dir(run_dir, previous)))
            state = fingerprint.state(folder, record, inputs)
            if name == EXPORT and state.action == "done" and not layout.dataset_dir(run_dir).is_dir():
                state = fingerprint.State("continue", f"{layout.DATASET}/ is missing")
        steps.append(Step(name, state.action, state.reason))
        changing = changing or state.action != "done"
        previous = name
    return steps


def _collect_steps(recipe: Any, run_dir: Path, forced: bool) -> list[Step]:
    sources = recipe.sources()
    stage_dir = layout.stage_dir(run_dir, "collect")
    keep = {config.folder for config in sources}
    steps = [Step(f"collect {p.name}", "remove", "not in the recipe any more")
             for p in (sorted(stage_dir.iterdir()) if stage_dir.is_dir() else [])
             if p.is_dir() and (p / layout.FINGERPRINT).exists() and p.name not in keep]
    for config in sources:
        state = fingerprint.State("rebuild", "--from collect") if forced else source_state(run_dir, config)
        steps.append(Step(f"collect {config.folder}", state.action, state.reason))
    if all(s.action == "done" for s in steps) and not (
            (stage_dir / shards.MANIFEST).exists() and fingerprint.read(stage_dir) == collect_record(run_dir)):
        steps.append(Step("collect", "continue", "one row per id, then the manifest"))
    return steps


def nothing_to_do(steps: list[Step]) -> bool:
    return all(step.action == "done" for step in steps)
