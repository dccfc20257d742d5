"""Progress for every long loop: one bar style on a terminal, plain log lines without one.

    with progress_bar("pair (nsfw -> pair)", total=210) as bar:
        bar.advance(16)                      # from any thread

On a terminal (stderr is a TTY) this draws a rich bar: done/total, rate, elapsed, time left. Without one (nohup,
SLURM, a pipe into a log file) it prints a plain line every `SURD_PROGRESS_EVERY` seconds (default 5; also when
nothing moved, so a log shows the run is alive) and a last one when the loop ends:

    [surd] pair (nsfw -> pair): 48/210 rows (23%), 1.9 rows/s, elapsed 0:25, ETA 1:25

Any other long loop uses the same helper, e.g. denoising steps in generate or eval:

    for prompt in track(prompts, "generate", unit="prompts"): ...
    with progress_bar("validation", total=steps, unit="steps") as bar:
        pipe(..., callback_on_step_end=lambda p, i, t, kw: (bar.advance(1), kw)[1])
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

T = TypeVar("T")
DEFAULT_EVERY = 5.0


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:  # type: ignore[no-untyped-def]
        speed = task.finished_speed or task.speed
        return Text(f"   ... {self.unit}/s" if speed is None else f"{speed:8.1f} {self.unit}/s")


def clock(seconds: float) -> str:
    """0:25, 12:03, 1:02:03."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(label: str, done: int, total: int | None, elapsed: float, unit: str = "rows") -> str:
    """One plain progress line: label, done/total (share), average rate, elapsed, time left."""
    rate = done / elapsed if elapsed > 0 else 0.0
    count = f"{done}/{total} {unit} ({100 * done / total:.0f}%)" if total else f"{done} {unit}"
    line = f"{label}: {count}, {rate:.3g} {unit}/s, elapsed {clock(elapsed)}"
    if total and done < total:
        line += f", ETA {clock((total - done) / rate)}" if rate > 0 else ", ETA ?"
    return line


class Bar:
    """What a loop advances; `done` counts what it reported so far."""

    def __init__(self) -> None:
        self.done = 0
        self._lock = threading.Lock()

    def advance(self, n: int) -> None:
        if n:
            with self._lock:
                self.done += n
            self._moved(n)

    def _moved(self, n: int) -> None:
        pass


class _RichBar(Bar):
    def __init__(self, progress: Progress, task: int) -> None:
        super().__init__()
        self._progress, self._task = progress, task

    def _moved(self, n: int) -> None:
        self._progress.advance(self._task, n)


class _LogBar(Bar):
    """Prints `progress_line` every `every` seconds from a daemon thread, and once more at the end."""

    def __init__(self, label: str, total: int | None, unit: str, every: float, stream: TextIO) -> None:
        super().__init__()
        self.label, self.total, self.unit, self.every, self.stream = label, total, unit, every, stream
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="surd-progress", daemon=True)
        self._thread.start()

    def _print(self) -> None:
        line = progress_line(self.label, self.done, self.total, time.monotonic() - self._start, self.unit)
        print(f"[surd] {line}", file=self.stream, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self._print()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._print()


def _every() -> float:
    try:
        return max(0.05, float(os.environ.get("SURD_PROGRESS_EVERY", DEFAULT_EVERY)))
    except ValueError:
        return DEFAULT_EVERY


@contextmanager
def progress_bar(label: str, total: int | None, enabled: bool = True, unit: str = "rows") -> Iterator[Bar]:
    """A progress display on stderr: a rich bar on a terminal, a plain line every few seconds otherwise."""
    if not enabled:
        yield Bar()
        return
    if not sys.stderr.isatty():
        bar = _LogBar(label, total, unit, _every(), sys.stderr)
        try:
            yield bar
        finally:
            bar.close()
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        yield _RichBar(progress, progress.add_task(label, total=total))


def track(items: Iterable[T], label: str, total: int | None = None, unit: str = "items",
          enabled: bool = True) -> Iterator[T]:
    """Iterate `items`, advancing a `progress_bar` by one per item."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(label, total, enabled=enabled, unit=unit) as bar:
        for item in items:
            yield item
            bar.advance(1)


def notice(text: str) -> None:
    """One line a user must see (a rebuild and why, a cycle that ended paging), even with progress bars off."""
    Console(stderr=True, soft_wrap=True).print(text, markup=False, highlight=False)
