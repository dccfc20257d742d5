"""`surd fetch DIR [--concurrency N] [--allow-private-hosts] [--retry-failed]`: the fetch stage's own command.

It replaces the generic stage command for `fetch` (same --recipe/--set/--workers/--quiet) and adds
the flags the issue names; each flag is a `FetchConfig` field, so recipes can set them too.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    from surd.cli import QuietOpt, RecipeOpt, SetOpt, WorkersOpt

    app.registered_commands[:] = [c for c in app.registered_commands if c.name != "fetch"]

    @app.command("fetch")
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
        """Download images for rows that have only an image_url."""
        from surd.cli import console, run_one_stage

        overrides = {"concurrency": concurrency, "allow_private_hosts": allow_private_hosts or None}
        if not retry_failed:
            run_one_stage("fetch", run_dir, recipe, sets, workers, quiet, overrides=overrides)
            return
        from surd.cli import _stage_options
        from surd.fetch_retry import retry_failed as retry

        config = _stage_options("fetch", run_dir, recipe, sets)
        config = type(config).model_validate({**config.model_dump(), **{k: v for k, v in overrides.items() if v}})
        summary = retry(run_dir, config)
        console.print(
            f"[bold]fetch --retry-failed[/]: {summary['retried']} retried, {summary['recovered']} recovered, "
            f"{summary['still_failing']} still failing"
        )
