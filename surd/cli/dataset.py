"""Dataset commands: `surd run`, `collect`, `explain`, `fetch`, the other stage commands, `export`, `stats`,
`report`, `models tiny`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from typer.core import TyperCommand

from surd import layout
from surd.cli.common import (
    OutOpt,
    QuietOpt,
    RecipeOpt,
    SetOpt,
    WorkersOpt,
    console,
    parse_sets,
    print_stats,
    require_run,
)
from surd.errors import SurdError, explain_validation

STAGE_HELP = {
    "dedup": "Drop exact and near-duplicate images (part of `surd clean`).",
    "nsfw": "Score images with the NSFW classifier; drop or flag.",
    "pair": "Write narrative prompts (LLM rewrite, captioner, or both).",
    "score": "CLIP-score prompts against images and keep matching narratives.",
}


def _reviews_for(run_dir: Path) -> Any:
    path = layout.reviews_path(run_dir)
    if not path.exists():
        return None
    from annotations.reviews import ReviewApplier

    return ReviewApplier(path)


def run(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    out: Path = OutOpt,
    workers: int = WorkersOpt,
    until: str | None = typer.Option(None, "--until", help="stop after this stage"),
    rebuild_from: str | None = typer.Option(None, "--from", help="rebuild this stage and every later one"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print what the run would do, and write nothing"),
    executor: str = typer.Option("local", "--executor", help="local or ray"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (auto, ray://...)"),
    quiet: bool = QuietOpt,
) -> None:
    """Run a whole recipe into OUT (resumable: rerun to continue; changed settings rebuild what they change)."""
    from adapter.recipe import ModelRecipe
    from pipelines.recipe import load_recipe
    from pipelines.run import check_until, run_recipe
    from pipelines.runfolder import check_out, hold

    check_until(until)
    check_until(rebuild_from, "--from")
    if executor not in ("local", "ray"):
        raise SurdError(f"--executor {executor!r}: expected local or ray")
    spec = load_recipe(recipe, out, model=ModelRecipe)
    check_out(out, own=_paths_inside(spec, out))
    if dry_run:
        _print_plan(spec, out, until, rebuild_from)
        return
    with hold(out):
        _prepare(spec.prepare)
        if executor == "local":
            ran = run_recipe(spec, out, workers=workers, until=until, reviews=_reviews_for(out), progress=not quiet,
                             rebuild_from=rebuild_from)
        else:
            from pipelines.ray import run_recipe_ray

            ran = run_recipe_ray(spec, out, until=until, address=address, reviews=_reviews_for(out),
                                 progress=not quiet, collect_workers=workers, rebuild_from=rebuild_from)
        stats(out, as_json=False)
        if spec.train is not None and (until is None or until == "train") and "export" in ran:
            from surd.cli.adapter import train_from_recipe

            train_from_recipe(spec, out)


def _print_plan(spec: Any, out: Path, until: str | None, rebuild_from: str | None) -> None:
    """`surd run --dry-run`: the plan, one line per source and stage; reads the run folder, writes nothing."""
    from pipelines.plan import nothing_to_do, plan_run

    console.print(f"[bold]plan for {out}[/] (recipe {spec.name}; nothing is written)")
    prepare = spec.prepare
    if prepare.demo_data and not Path(prepare.demo_data).exists():
        console.print(f"prepare: will write the demo images to {prepare.demo_data}", markup=False)
    if prepare.tiny_models and not (Path(prepare.tiny_models) / "DONE").exists():
        console.print(f"prepare: will write tiny models to {prepare.tiny_models}", markup=False)
    steps = plan_run(spec, out, until=until, rebuild_from=rebuild_from, reviews=_reviews_for(out))
    for step in steps:
        console.print(step.line(), markup=False, highlight=False)
    if spec.train is not None and (until is None or until == "train"):
        console.print("train: after export (the recipe's `train:` section)", markup=False)
    if nothing_to_do(steps):
        console.print("nothing to do: the run is up to date with the recipe", markup=False)


def _prepare(prepare: Any) -> None:
    if prepare.demo_data and not Path(prepare.demo_data).exists():
        from surd.demo import make_demo_data

        counts = make_demo_data(Path(prepare.demo_data))
        console.print(f"demo images written to {prepare.demo_data}: {counts}")
    if prepare.tiny_models and not (Path(prepare.tiny_models) / "DONE").exists():
        tiny(Path(prepare.tiny_models))


# Source options that `surd collect` takes as their own flag (the rest: --option KEY=VALUE).
COLLECT_FLAGS = {"path": "PATH", "name": "--name", "max_items": "--max-items", "limit": "--limit",
                 "api_base": "--api-base", "rows_per_shard": "--rows-per-shard"}


class CollectCommand(TyperCommand):
    """`surd collect`, whose `--help` ends with the options of the source named on the line (or the sources)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        takes_value = {name for p in self.params if p.param_type_name == "option" and not getattr(p, "is_flag", False)
                       for name in p.opts}
        words = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] not in takes_value)]
        ctx.meta["surd.source"] = words[0] if words else None
        return super().parse_args(ctx, args)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from surd.sources import SOURCE_TYPES, source_help

        source = ctx.meta.get("surd.source")
        text = source_help(source, COLLECT_FLAGS) if source else (  # an unknown source fails here, in one line
            f"Sources: {', '.join(SOURCE_TYPES)}. Each one's options: surd collect SOURCE --help")
        super().format_help(ctx, formatter)  # typer's rich help prints now; the formatter's text follows it
        formatter.write(f"\n{text}\n")


def collect_cmd(
    source: str = typer.Argument(..., help="folder, imagefolder, parquet, jsonl, civitai, diffusiondb, lexica"),
    path: str | None = typer.Argument(None, help="folder or file to read (local sources)"),
    out: Path = OutOpt,
    name: str | None = typer.Option(None, "--name", help="subfolder under collect/ (default: the source type)"),
    max_items: int | None = typer.Option(None, "--max-items", help="stop after this many rows (API sources)"),
    limit: int | None = typer.Option(None, "--limit", help="page size (API sources)"),
    api_base: str | None = typer.Option(None, "--api-base", help="API base URL (mirrors, proxies, tests)"),
    rows_per_shard: int | None = typer.Option(None, "--rows-per-shard", help="rows per collect shard"),
    option: list[str] | None = typer.Option(None, "--option", help="other source option KEY=VALUE; repeatable"),
    workers: int = WorkersOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Collect prompt/image pairs from a source into OUT/collect/<name>/ (`surd collect SOURCE --help`: its options)."""
    from pipelines.collect import collect
    from pipelines.runfolder import check_out, hold
    from surd.sources import source_config

    raw = {"type": source, "path": path, "name": name, "max_items": max_items, "limit": limit,
           "api_base": api_base, "rows_per_shard": rows_per_shard, **parse_sets(option, "--option")}
    config = source_config({k: v for k, v in raw.items() if v is not None})
    check_out(out)
    with hold(out):
        print_stats("collect", collect(out, config, workers=workers, progress=not quiet))


def explain_cmd(
    files: list[Path] = typer.Argument(..., help="image files (sidecars beside them are read too)"),
    bare_comments: bool = typer.Option(False, "--bare-comments", help="as the folder source option: a comment "
                                       "without generation settings counts as a prompt"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of lines"),
) -> None:
    """Which metadata reader matched each file and what it found: the row the folder source would make."""
    from surd.sources.folder import explain, explain_text

    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SurdError(f"not a file: {', '.join(missing)}")
    entries = explain(files, bare_comments=bare_comments)
    if as_json:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
    else:
        console.print(explain_text(entries), markup=False, highlight=False, soft_wrap=True)


def stage_options(stage: str, run_dir: Path, recipe: Path | None, sets: list[str] | None) -> Any:
    from pipelines.recipe import load_recipe
    from pipelines.registry import stage_config

    section: dict[str, Any] = {}
    if recipe is not None:
        section = dict(getattr(load_recipe(recipe, run_dir), stage) or {})
    section.update(parse_sets(sets))
    return stage_config(stage, section)


def run_one_stage(stage: str, run_dir: Path, recipe: Path | None, sets: list[str] | None, workers: int,
                  quiet: bool, overrides: dict[str, Any] | None = None) -> None:
    """Validate a stage's options (recipe section, then --set, then explicit flags) and run it."""
    from pipelines.local import run_stage

    config = stage_options(stage, run_dir, recipe, sets)
    if overrides:
        config = config.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        config = type(config).model_validate(config.model_dump())
    with writing(run_dir):
        print_stats(stage, run_stage(run_dir, stage, config, workers=workers, progress=not quiet))


def _paths_inside(spec: Any, out: Path) -> list[Path]:
    """The paths a recipe names inside its run folder (`${out}/images`): the user put them there on purpose."""
    found: list[Path] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value and Path(out).resolve() in Path(value).resolve().parents:
            found.append(Path(value))

    walk(spec.model_dump(mode="json"))
    return found


@contextmanager
def writing(run_dir: Path) -> Iterator[None]:
    """A stage command's hold on an existing run folder (its lock), refusing a folder that is not a run."""
    from pipelines.runfolder import hold

    with hold(require_run(run_dir)):
        yield


def _stage_command(stage: str, help_text: str) -> Any:
    def command(
        run_dir: Path = typer.Argument(..., help="run folder"),
        recipe: Path | None = RecipeOpt,
        sets: list[str] | None = SetOpt,
        workers: int = WorkersOpt,
        quiet: bool = QuietOpt,
    ) -> None:
        run_one_stage(stage, run_dir, recipe, sets, workers, quiet)

    command.__doc__ = help_text
    return command


def fetch_cmd(
    run_dir: Path = typer.Argument(..., help="run folder"),
    recipe: Path | None = RecipeOpt,
    sets: list[str] | None = SetOpt,
    concurrency: int | None = typer.Option(None, "--concurrency", min=1, help="downloads in flight"),
    allow_private_hosts: bool = typer.Option(
        False, "--allow-private-hosts", help="allow private/loopback targets (local mirrors, tests)"
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="only re-try rows an earlier fetch dropped for transient reasons"
    ),
    workers: int = WorkersOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Download images for rows that have only an image_url (or re-try the transient failures)."""
    overrides = {"concurrency": concurrency, "allow_private_hosts": allow_private_hosts or None}
    if not retry_failed:
        run_one_stage("fetch", run_dir, recipe, sets, workers, quiet, overrides=overrides)
        return
    from pipelines.retry import retry_failed as retry_pass

    config = stage_options("fetch", run_dir, recipe, sets)
    config = type(config).model_validate({**config.model_dump(), **{k: v for k, v in overrides.items() if v}})
    with writing(run_dir):
        summary = retry_pass(run_dir, config, progress=not quiet)
    console.print(
        f"[bold]fetch --retry-failed[/]: {summary['retried']} retried, {summary['recovered']} recovered, "
        f"{summary['still_failing']} still failing"
    )


def clean_cmd(
    run_dir: Path = typer.Argument(..., help="run folder"),
    recipe: Path | None = RecipeOpt,
    sets: list[str] | None = SetOpt,
    dedup_sets: list[str] | None = typer.Option(None, "--dedup-set", help="override a dedup option KEY=VALUE"),
    workers: int = WorkersOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Clean prompts and images, then drop exact and near duplicates (stages clean + dedup)."""
    with writing(run_dir):
        run_one_stage("clean", run_dir, recipe, sets, workers, quiet)
        run_one_stage("dedup", run_dir, recipe, dedup_sets, workers, quiet)


def export_cmd(
    run_dir: Path = typer.Argument(..., help="run folder"),
    fmt: str = typer.Option("parquet", "--format", help="parquet (HF layout in DIR/surd) or imagefolder"),
    test_fraction: float | None = typer.Option(None, "--test-fraction", help="share of ids in the test split"),
    shard_size_mb: float | None = typer.Option(None, "--shard-size-mb", help="target Parquet shard size"),
    recipe: Path | None = RecipeOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Write the final dataset: DIR/surd/ (HF hub layout), or DIR/surd-imagefolder/ (original SURD layout)."""
    from pydantic import ValidationError

    from pipelines.export import ExportConfig, export, last_recipe_name
    from pipelines.recipe import load_recipe

    spec = load_recipe(recipe, run_dir) if recipe else None
    base = spec.export.model_dump() if spec else {}
    base.update({k: v for k, v in {"format": fmt, "test_fraction": test_fraction,
                                    "shard_size_mb": shard_size_mb}.items() if v is not None})
    try:
        config = ExportConfig.model_validate(base)
    except ValidationError as e:
        raise SurdError(explain_validation(e, "export options")) from None
    # the card's title: the recipe's name, else the one the last export used (so the same export is not redone)
    name = spec.name if spec else (last_recipe_name(run_dir) or "surd")
    with writing(run_dir):
        stats_ = export(run_dir, config, reviews=_reviews_for(run_dir), recipe_name=name, progress=not quiet)
    print_stats("export", stats_)
    console.print(f"dataset: {layout.dataset_dir(run_dir)}")


def stats(
    run_dir: Path = typer.Argument(..., help="run folder"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Rows in / kept / dropped (by reason) for every stage of a run."""
    from pipelines.fingerprint import stale
    from surd.shards import MANIFEST, stage_stats

    require_run(run_dir)
    result = {}
    for stage in layout.stages_present(run_dir):
        folder = layout.stage_dir(run_dir, stage)
        s = stage_stats(folder)
        result[stage] = {"in": s["in"], "kept": s["kept"], "dropped": dict(sorted(s["dropped"].items()))}
        if s.get("counters"):
            result[stage]["counters"] = s["counters"]
        # numbers of a stage that is unfinished, or built from an input that has changed since, say so
        if not (folder / MANIFEST).exists():
            result[stage]["unfinished"] = True
        why = stale(run_dir, stage)
        if why:
            result[stage]["stale"] = why
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"SURD run {run_dir}")
    for column in ("stage", "in", "kept", "dropped", "reasons"):
        table.add_column(column, justify="right" if column in ("in", "kept", "dropped") else "left")
    for stage, s in result.items():
        reasons = ", ".join(f"{r}: {n}" for r, n in s["dropped"].items()) or "-"
        notes = [note for note in ("unfinished" if s.get("unfinished") else "",
                                   f"stale: {s['stale']}" if s.get("stale") else "") if note]
        label = f"{stage} ({'; '.join(notes)})" if notes else stage
        table.add_row(label, str(s["in"]), str(s["kept"]), str(sum(s["dropped"].values())), reasons)
    console.print(table)


def report(
    run_dir: Path = typer.Argument(..., help="run folder"),
    output: Path | None = typer.Option(None, "-o", "--output", help="HTML file to write (default: RUN/report.html)"),
) -> None:
    """A self-contained HTML report: models and thresholds, funnel, CLIP scores, drops with images, narratives,
    samples, training."""
    from surd.report import write_report

    require_run(run_dir)
    output = output or layout.report_path(run_dir)
    write_report(run_dir, output)
    console.print(f"report: {output}")


models_app = typer.Typer(help="Model folders for the demo and tests.", no_args_is_help=True)


@models_app.command("tiny")
def tiny(out: Path = typer.Argument(..., help="folder for clip/, llm/, sd/, sdxl/")) -> None:
    """Write tiny randomly initialised models (CLIP, LLM, SD, SDXL) for the offline demo and tests."""
    from surd.demo.tiny import write_tiny_clip, write_tiny_llm, write_tiny_sd, write_tiny_sdxl

    out.mkdir(parents=True, exist_ok=True)
    write_tiny_clip(out / "clip")
    write_tiny_llm(out / "llm")
    write_tiny_sd(out / "sd")
    write_tiny_sdxl(out / "sdxl")
    (out / "DONE").write_text("tiny random models; numbers produced with them are meaningless\n")
    console.print(f"tiny models written to {out}")


def register(app: typer.Typer) -> None:
    """Add the dataset commands to the `surd` command line."""
    app.command("run")(run)
    app.command("collect", cls=CollectCommand)(collect_cmd)
    app.command("explain")(explain_cmd)
    app.command("fetch")(fetch_cmd)
    app.command("clean")(clean_cmd)
    for stage, help_text in STAGE_HELP.items():
        app.command(stage)(_stage_command(stage, help_text))
    app.command("export")(export_cmd)
    app.command("stats")(stats)
    app.command("report")(report)
    app.add_typer(models_app, name="models")
