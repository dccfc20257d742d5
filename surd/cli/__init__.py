"""`surd`: the command line, the one room that imports every package. Thin: parse, call, print.

Each module adds its commands with `register(app)`: `dataset` (run, collect, stages, export, stats, report,
fetch, models), `review`, `adapter` (teacher, train, generate, adapter ...), `evaluation` (eval), `doctor`,
`experiment`.
`main()` turns every error a user can cause into one line: usage errors as click prints them (usage, a hint,
one `Error:` line; exit 2), `SurdError` and `OSError` as `error: ...` (exit 1). Bare `surd` prints the help.
"""

from __future__ import annotations

import errno
import os
import sys

import typer
from rich.text import Text

from surd.cli import adapter, dataset, doctor, evaluation, experiment, review
from surd.cli.common import err
from surd.errors import SurdError, describe_os_error, one_line

app = typer.Typer(help="Build SURD, review it in Label Studio, train the SUR-adapter.", no_args_is_help=True)
for _module in (dataset, review, adapter, evaluation, doctor, experiment):
    _module.register(app)

# Usage errors are raised by whichever click typer runs on: a copy inside typer (typer >= 0.20) or the click
# package. `typer.BadParameter` is one of them in both cases, so its ancestry names the right base class.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _fail(message: str, code: int = 1) -> None:
    err.print(Text.assemble(("error: ", "red"), one_line(message)), soft_wrap=True, highlight=False)
    sys.exit(code)


def main() -> None:
    try:
        result = app(standalone_mode=False)
    except SurdError as e:
        _fail(str(e))
    except _USAGE_ERROR as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `surd` or `surd review` alone: the help, and success
            text = e.format_message()  # rich help is printed while the error is made; plain help is its message
            if text:
                typer.echo(text)
            sys.exit(0)
        e.show()
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno == errno.EPIPE:  # `surd stats RUN | head`: the reader left; nothing to say
            sys.exit(1)
        if os.environ.get("SURD_TRACEBACK"):  # for a bug report: where the error came from
            raise
        _fail(describe_os_error(e))
    # Without standalone mode, an Exit raised inside a command (`--help` included) comes back as its code.
    sys.exit(result if isinstance(result, int) else 0)
