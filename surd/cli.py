"""`surd`: the command line. Thin: parse, call, print. User errors print without a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from surd.errors import SurdError

app = typer.Typer(help="Build SURD, review it in Label Studio, train the SUR-adapter.", no_args_is_help=True)
models_app = typer.Typer(help="Model folders for the demo and tests.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()
err = Console(stderr=True)

OutOpt = typer.Option(..., "--out", "-o", help="run folder (created if missing)")
WorkersOpt = typer.Option(1, "--workers", "-w", min=1, help="shards processed in parallel processes")
SetOpt = typer.Option(None, "--set", help="override a stage option: KEY=VALUE (VALUE parsed as YAML); repeatable")
RecipeOpt = typer.Option(None, "--recipe", help="take this stage's options from a recipe's section")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress bar")


def _parse_sets(values: list[str] | None, flag: str = "--set") -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SurdError(f"{flag} {item!r}: expected KEY=VALUE")
        parsed[key.strip()] = yaml.safe_load(value) if value else None
    return parsed


def _reviews_for(run_dir: Path) -> Any:
    path = Path(run_dir) / "reviews.parquet"
    if not path.exists():
        return None
    from annotations.reviews import ReviewApplier

    return ReviewApplier(path)


def _print_stats(name: str, stats: dict[str, Any]) -> None:
    dropped = ", ".join(f"{r}: {n}" for r, n in sorted(stats["dropped"].items())) or "none"
    console.print(f"[bold]{name}[/]: {stats['in']} in, {stats['kept']} kept; dropped: {dropped}")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    out: Path = OutOpt,
    workers: int = WorkersOpt,
    until: str | None = typer.Option(None, "--until", help="stop after this stage"),
    executor: str = typer.Option("local", "--executor", help="local or ray"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (auto, ray://...)"),
    quiet: bool = QuietOpt,
) -> None:
    """Run a whole recipe into OUT (resumable: rerun to continue)."""
    from pipelines.recipe import load_recipe
    from pipelines.run import check_until, run_recipe

    check_until(until)
    spec = load_recipe(recipe, out)
    out.mkdir(parents=True, exist_ok=True)
    _prepare(spec.prepare)
    if executor == "local":
        ran = run_recipe(spec, out, workers=workers, until=until, reviews=_reviews_for(out), progress=not quiet)
    elif executor == "ray":
        from pipelines.ray import run_recipe_ray

        ran = run_recipe_ray(spec, out, until=until, address=address, reviews=_reviews_for(out),
                             progress=not quiet, collect_workers=workers)
    else:
        raise SurdError(f"--executor {executor!r}: expected local or ray")
    stats(out, as_json=False)
    if spec.train is not None and (until is None or until == "train") and "export" in ran:
        from adapter.cli import train_from_recipe

        train_from_recipe(spec, out)


def _prepare(prepare: Any) -> None:
    if prepare.demo_data and not Path(prepare.demo_data).exists():
        from surd.demo import make_demo_data

        counts = make_demo_data(Path(prepare.demo_data))
        console.print(f"demo images written to {prepare.demo_data}: {counts}")
    if prepare.tiny_models and not (Path(prepare.tiny_models) / "DONE").exists():
        tiny(Path(prepare.tiny_models))


@app.command("collect")
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
    """Collect prompt/image pairs from a source into OUT/collect/<name>/."""
    from pipelines.collect import collect
    from surd.sources import source_config

    raw = {"type": source, "path": path, "name": name, "max_items": max_items, "limit": limit,
           "api_base": api_base, "rows_per_shard": rows_per_shard, **_parse_sets(option, "--option")}
    config = source_config({k: v for k, v in raw.items() if v is not None})
    _print_stats("collect", collect(out, config, workers=workers, progress=not quiet))


def _stage_options(stage: str, run_dir: Path, recipe: Path | None, sets: list[str] | None) -> Any:
    from pipelines.recipe import load_recipe
    from pipelines.stages import stage_config

    section: dict[str, Any] = {}
    if recipe is not None:
        section = dict(getattr(load_recipe(recipe, run_dir), stage) or {})
    section.update(_parse_sets(sets))
    return stage_config(stage, section)


def run_one_stage(stage: str, run_dir: Path, recipe: Path | None, sets: list[str] | None, workers: int,
                  quiet: bool, overrides: dict[str, Any] | None = None) -> None:
    """Validate a stage's options (recipe section, then --set, then explicit flags) and run it."""
    from pipelines.local import run_stage

    config = _stage_options(stage, run_dir, recipe, sets)
    if overrides:
        config = config.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        config = type(config).model_validate(config.model_dump())
    _print_stats(stage, run_stage(run_dir, stage, config, workers=workers, progress=not quiet))


def _stage_command(stage: str, help_text: str) -> None:
    def command(
        run_dir: Path = typer.Argument(..., help="run folder"),
        recipe: Path | None = RecipeOpt,
        sets: list[str] | None = SetOpt,
        workers: int = WorkersOpt,
        quiet: bool = QuietOpt,
    ) -> None:
        run_one_stage(stage, run_dir, recipe, sets, workers, quiet)

    command.__doc__ = help_text
    app.command(stage)(command)


@app.command("clean")
def clean_cmd(
    run_dir: Path = typer.Argument(..., help="run folder"),
    recipe: Path | None = RecipeOpt,
    sets: list[str] | None = SetOpt,
    dedup_sets: list[str] | None = typer.Option(None, "--dedup-set", help="override a dedup option KEY=VALUE"),
    workers: int = WorkersOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Clean prompts and images, then drop exact and near duplicates (stages clean + dedup)."""
    run_one_stage("clean", run_dir, recipe, sets, workers, quiet)
    run_one_stage("dedup", run_dir, recipe, dedup_sets, workers, quiet)


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="run folder"),
    fmt: str = typer.Option("parquet", "--format", help="parquet (HF layout in DIR/surd) or imagefolder"),
    test_fraction: float | None = typer.Option(None, "--test-fraction", help="share of ids in the test split"),
    shard_size_mb: float | None = typer.Option(None, "--shard-size-mb", help="target Parquet shard size"),
    recipe: Path | None = RecipeOpt,
) -> None:
    """Write the final dataset: DIR/surd/ (HF hub layout), or DIR/surd-imagefolder/ (original SURD layout)."""
    from pydantic import ValidationError

    from pipelines.export import ExportConfig, export
    from pipelines.recipe import load_recipe

    base = load_recipe(recipe, run_dir).export.model_dump() if recipe else {}
    base.update({k: v for k, v in {"format": fmt, "test_fraction": test_fraction,
                                    "shard_size_mb": shard_size_mb}.items() if v is not None})
    try:
        config = ExportConfig.model_validate(base)
    except ValidationError as e:
        raise SurdError(f"export options: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None
    _print_stats("export", export(run_dir, config, reviews=_reviews_for(run_dir)))
    console.print(f"dataset: {run_dir / 'surd'}")


@app.command()
def stats(
    run_dir: Path = typer.Argument(..., help="run folder"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Rows in / kept / dropped (by reason) for every stage of a run."""
    from pipelines.stages import ORDER
    from surd.shards import stage_stats

    if not Path(run_dir).is_dir():
        raise SurdError(f"run folder not found: {run_dir}")
    result = {}
    for stage in ORDER:
        if (Path(run_dir) / stage / "_stats").is_dir():
            s = stage_stats(Path(run_dir) / stage)
            result[stage] = {"in": s["in"], "kept": s["kept"], "dropped": dict(sorted(s["dropped"].items()))}
            if s.get("counters"):
                result[stage]["counters"] = s["counters"]
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"SURD run {run_dir}")
    for column in ("stage", "in", "kept", "dropped", "reasons"):
        table.add_column(column, justify="right" if column in ("in", "kept", "dropped") else "left")
    for stage, s in result.items():
        reasons = ", ".join(f"{r}: {n}" for r, n in s["dropped"].items()) or "-"
        table.add_row(stage, str(s["in"]), str(s["kept"]), str(sum(s["dropped"].values())), reasons)
    console.print(table)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="run folder"),
    output: Path = typer.Option(..., "-o", "--output", help="HTML file to write"),
) -> None:
    """A self-contained HTML report: funnel, drop reasons, histograms, sample grid."""
    from pipelines.stages import ORDER
    from surd.report import write_report

    if not Path(run_dir).is_dir():
        raise SurdError(f"run folder not found: {run_dir}")
    write_report(run_dir, output, stages=ORDER)
    console.print(f"report: {output}")


@models_app.command("tiny")
def tiny(out: Path = typer.Argument(..., help="folder for clip/, llm/, sd/")) -> None:
    """Write tiny randomly initialised models (CLIP, LLM, SD) for the offline demo and tests."""
    from adapter.tiny import write_tiny_sd
    from surd.clip import write_tiny_clip
    from surd.llm import write_tiny_llm

    out.mkdir(parents=True, exist_ok=True)
    write_tiny_clip(out / "clip")
    write_tiny_llm(out / "llm")
    write_tiny_sd(out / "sd")
    (out / "DONE").write_text("tiny random models; numbers produced with them are meaningless\n")
    console.print(f"tiny models written to {out}")


for _stage, _help in {
    "dedup": "Drop exact and near-duplicate images (part of `surd clean`).",
    "nsfw": "Score images with the NSFW classifier; drop or flag.",
    "pair": "Write narrative prompts (LLM rewrite, captioner, or both).",
    "score": "CLIP-score prompts against images and keep matching narratives.",
}.items():
    _stage_command(_stage, _help)


def _register_plugins() -> None:
    """Commands owned by other packages (they import surd, so they register themselves here)."""
    from adapter import cli as adapter_cli
    from adapter import eval_cli
    from annotations import cli as annotations_cli
    from surd import cli_fetch

    for module in (annotations_cli, adapter_cli, eval_cli, cli_fetch):
        module.register(app)


_register_plugins()


def main() -> None:
    try:
        app(standalone_mode=False)
    except SurdError as e:
        err.print(f"[red]error:[/] {e}")
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
