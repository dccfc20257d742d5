"""Errors a user can cause. The CLI prints them without a traceback and exits non-zero."""


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
    problems = "; ".join(
        f"key {'.'.join(str(x) for x in err['loc']) or '(section)'!r}: {err['msg']}"
        for err in error.errors()  # type: ignore[attr-defined]
    )
    return f"{where}: {problems}"
