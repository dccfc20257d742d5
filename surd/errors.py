"""Errors a user can cause. The CLI prints them without a traceback and exits non-zero."""

from __future__ import annotations

import errno
import os
import re


class SurdError(Exception):
    """Base class: the message must name the file, row, key or flag at fault."""


class RecipeError(SurdError):
    """A recipe (YAML) is missing, malformed or fails validation."""


class SourceError(SurdError):
    """A source (folder, file, API) cannot be read as configured."""


class ShardError(SurdError):
    """A shard or stage folder is missing, corrupt, or from another schema version."""


class StageError(SurdError):
    """A stage cannot run: its input stage is missing or its configuration is wrong."""


def explain_validation(error: object, where: str) -> str:
    """One line naming each bad key of a pydantic ValidationError: `where: key 'a.b': message; ...`."""
    problems = []
    for err in error.errors():  # type: ignore[attr-defined]
        key = ".".join(str(x) for x in err["loc"])
        message = "required" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
        problems.append(f"key {key!r}: {message}" if key else message)  # no key: a check across keys
    return f"{where}: {'; '.join(problems)}"


# Errors that only a write can cause: name them as such (`no space left on device writing RUN/clean/...`).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}


def one_line(message: str) -> str:
    """`message` on one line: inner line breaks (a YAML parser's, a server's) become spaces."""
    return re.sub(r"\s*[\r\n]+\s*", " ", message.strip())


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: what went wrong (the system's words) and the file, e.g. `permission denied: RUN`."""
    what = os.strerror(e.errno) if e.errno else (e.strerror or str(e) or type(e).__name__)
    what = what[:1].lower() + what[1:]
    if e.filename is None:
        return one_line(what)
    where = str(e.filename) + (f" -> {e.filename2}" if e.filename2 is not None else "")
    return one_line(f"{what} writing {where}" if e.errno in _WRITE_ERRNOS else f"{what}: {where}")
