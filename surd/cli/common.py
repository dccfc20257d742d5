"""What every command module of the CLI shares: consoles, common options, small parsers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console

from surd import layout
from surd.errors import SurdError

console = Console()
err = Console(stderr=True)

OutOpt = typer.Option(..., "--out", "-o", help="run folder (created if missing)")
WorkersOpt = typer.Option(1, "--workers", "-w", min=1, help="shards processed in parallel processes")
SetOpt = typer.Option(None, "--set", help="override a stage option: KEY=VALUE (VALUE parsed as YAML); repeatable")
RecipeOpt = typer.Option(None, "--recipe", help="take this stage's options from a recipe's section")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress bar")


def parse_sets(values: list[str] | None, flag: str = "--set", into: dict[str, Any] | None = None) -> dict[str, Any]:
    """KEY=VALUE pairs (VALUE parsed as YAML; dots in KEY nest) set into `into` (default: a new mapping)."""
    parsed: dict[str, Any] = {} if into is None else into
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SurdError(f"{flag} {item!r}: expected KEY=VALUE")
        *parents, leaf = key.strip().split(".")
        node = parsed
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(value) if value else None
    return parsed


def print_stats(name: str, stats: dict[str, Any]) -> None:
    dropped = ", ".join(f"{r}: {n}" for r, n in sorted(stats["dropped"].items())) or "none"
    console.print(f"[bold]{name}[/]: {stats['in']} in, {stats['kept']} kept; dropped: {dropped}")


def require_run(run_dir: Path) -> Path:
    """`run_dir` if it is a surd run folder (`pipelines.runfolder.is_run`), else a one-line error."""
    from pipelines.runfolder import is_run

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise SurdError(f"run folder not found: {run_dir}; run `surd collect ... --out {run_dir}` first")
    if not run_dir.is_dir():
        raise SurdError(f"not a folder: {run_dir} (a run folder is what `surd run ... --out` writes)")
    if not is_run(run_dir):
        raise SurdError(f"not a surd run folder: {run_dir} (no stage folder: {', '.join(layout.STAGES)}); "
                        f"run `surd collect ... --out {run_dir}` first")
    return run_dir
