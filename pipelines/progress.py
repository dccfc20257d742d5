"""One progress bar style for every executor: rows done, rows/s, elapsed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:  # type: ignore[no-untyped-def]
        speed = task.finished_speed or task.speed
        return Text(f"   ... {self.unit}/s" if speed is None else f"{speed:8.1f} {self.unit}/s")


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, rows: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, rows)


@contextmanager
def progress_bar(label: str, total: int | None, enabled: bool = True, unit: str = "rows") -> Iterator[_Bar]:
    """A rich progress bar on stderr (silent when disabled or when stderr is not a terminal)."""
    console = Console(stderr=True)
    if not enabled or not sys.stderr.isatty():
        yield _Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        _RateColumn(unit),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=total)
        yield _Bar(progress, task)


def notice(text: str) -> None:
    """One line a user must see (a rebuild and why, a cycle that ended paging), even with progress bars off."""
    Console(stderr=True, soft_wrap=True).print(text, markup=False, highlight=False)
