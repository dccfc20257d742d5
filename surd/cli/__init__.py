"""`surd`: the command line, the one room that imports every package. Thin: parse, call, print.

Each module adds its commands with `register(app)`: `dataset` (run, collect, stages, export, stats, report,
fetch, models), `review`, `adapter` (teacher, train, generate, adapter ...), `evaluation` (eval), `experiment`.
User errors (`SurdError`) print one line without a traceback.
"""

from __future__ import annotations

import sys

import typer

from surd.cli import adapter, dataset, evaluation, experiment, review
from surd.cli.common import err
from surd.errors import SurdError

app = typer.Typer(help="Build SURD, review it in Label Studio, train the SUR-adapter.", no_args_is_help=True)
for _module in (dataset, review, adapter, evaluation, experiment):
    _module.register(app)


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
