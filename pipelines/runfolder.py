"""A run folder: which folders may become one (`check_out`), and the lock its one writer holds (`hold`).

A folder is a surd run when it holds the lock file `.surd-lock` (every command that writes a run creates it), a
stage folder with a fingerprint, stats or manifest (runs made before the lock existed), or an exported dataset.
`--out` refuses `/`, the home folder, a file, and a non-empty folder that is not a run: a run's stage commands
delete and rename folders inside it, which must never touch a folder of someone else's.

The lock is an OS lock (`fcntl.flock`) on `RUN/.surd-lock`, held for the whole command; the file holds the
holder's PID and command line, for the message a second command prints when it refuses. The kernel releases the
lock when its process ends, however it ends, so a lock left by a killed command is simply taken over.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from surd import layout, shards
from surd.errors import SurdError


class RunFolderError(SurdError):
    """`--out` names a folder that must not become a run folder."""


class RunLocked(SurdError):
    """Another command is writing the run folder."""


def is_run(path: Path) -> bool:
    """A surd run folder: it holds the lock file, a stage folder with a fingerprint, stats or manifest, or a dataset."""
    path = Path(path)
    if layout.lock_path(path).exists() or (layout.dataset_data_dir(path)).is_dir():
        return True
    for stage in layout.STAGES:
        folder = layout.stage_dir(path, stage)
        if any((folder / name).exists() for name in (layout.FINGERPRINT, "_stats", shards.MANIFEST)):
            return True
    return False


def check_out(out: Path, flag: str = "--out", own: Iterable[Path] = ()) -> None:
    """Refuse a run folder that is `/`, the home folder, a file, or a non-empty folder that is not a run.

    `own`: paths the recipe itself places in the folder (`${out}/images` as a source): they do not make it foreign.
    """
    resolved = Path(out).expanduser().resolve()
    if resolved == Path(resolved.anchor):
        raise RunFolderError(f"{flag} {out}: the root folder cannot be a run folder; name a folder for the run")
    if resolved == Path.home().resolve():
        raise RunFolderError(f"{flag} {out}: the home folder cannot be a run folder; name a folder inside it")
    if resolved.exists() and not resolved.is_dir():
        raise RunFolderError(f"{flag} {out}: not a folder")
    owned = [Path(p).expanduser().resolve() for p in own]
    foreign = [entry for entry in resolved.iterdir() if not any(p == entry or entry in p.parents for p in owned)] \
        if resolved.is_dir() else []
    if foreign and not is_run(resolved):
        raise RunFolderError(
            f"{flag} {out}: not empty and not a surd run folder (no {layout.LOCK} and no stage folder); "
            "name a new or empty folder")


_HELD: dict[Path, list[int]] = {}  # resolved run folder -> [fd, depth]: a process may take its own lock again


@contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock for the block; refuse in one line, naming the holder, if another process has it."""
    key = Path(run_dir).expanduser().resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    key.mkdir(parents=True, exist_ok=True)
    fd = _acquire(key)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        os.close(fd)  # releases the lock; the file stays, so the folder is still recognised as a run


def _acquire(run_dir: Path) -> int:
    import fcntl

    path = layout.lock_path(run_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(path)
        os.close(fd)
        raise RunLocked(f"{run_dir} is in use by another surd command ({holder}); wait for it to finish, "
                        "or stop it") from None
    except OSError as e:  # a filesystem without locks (some network mounts): say so and go on unguarded
        from pipelines.progress import notice

        notice(f"warning: cannot lock {path} ({e.strerror}); two commands on this run would not notice each other")
        return fd
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {' '.join(['surd', *sys.argv[1:]])[:120]}\n".encode())
    return fd


def _holder(path: Path) -> str:
    """Who holds the lock, from the lock file (read again briefly if the holder has not written it yet)."""
    for _ in range(20):
        try:
            pid, _, command = path.read_text().strip().partition(" ")
        except OSError:
            pid, command = "", ""
        if pid.isdigit() and _alive(int(pid)):
            return f"pid {pid}: {command}"
        time.sleep(0.05)
    return "pid unknown"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
