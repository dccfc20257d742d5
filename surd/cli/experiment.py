"""`surd experiment`: build a small world, train its base model, judge and every adapter kind, evaluate, report."""

from __future__ import annotations

from pathlib import Path

import typer

from surd.cli.common import console, err
from surd.errors import SurdError


def register(app: typer.Typer) -> None:
    @app.command("experiment")
    def experiment(
        world: str = typer.Argument("shapes", help="the world to build (shapes)"),
        out: Path = typer.Option(..., "--out", "-o", help="experiment folder (created; rerun to reuse what is done)"),
        quick: bool = typer.Option(False, "--quick", help="the small run (~5 minutes on 2 CPU cores)"),
        seeds: int | None = typer.Option(None, "--seeds", min=1, help="generation seeds (default: 4, quick: 2)"),
        threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's)"),
        docs: Path | None = typer.Option(None, "--docs", help="also fill the results block of this Markdown page"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines"),
    ) -> None:
        """Measure what adapters do in a world where the answer is known; exits 2 if the instrument is not sane."""
        from adapter.experiment import FULL, QUICK, WORLDS, run

        if world not in WORLDS:
            raise SurdError(f"experiment {world!r}: unknown world; worlds: {', '.join(WORLDS)}")
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        settings = (QUICK if quick else FULL).with_seeds(seeds)
        result = run(out, settings, docs=docs, progress=not quiet,
                     log=(lambda _: None) if quiet else (lambda line: err.print(line)))
        console.print((out / "report.md").read_text(), markup=False)
        console.print(f"report: {out / 'report.html'}")
        if not result["valid"]:
            err.print("[red]the run is INVALID[/]: a sanity check failed (see the report's first table)")
            raise typer.Exit(2)
