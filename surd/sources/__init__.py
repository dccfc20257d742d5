"""Source registry: `type` in a recipe's `collect:` list -> (config model, builder), and each source's help.

Each source module defines a pydantic config with a `type: Literal[...]` field and a class built from it;
add one line per source to `_REGISTRY` below. `source_help` describes a source's options from that config (their
descriptions, defaults, what is required), so the help never drifts from what is validated.
"""

from __future__ import annotations

import typing
from typing import Any

from surd.errors import RecipeError, explain_validation

_REGISTRY: dict[str, str] = {
    # type: "module:ConfigClass" (a surd.sources.base.SourceConfig subclass)
    "folder": "surd.sources.folder:FolderConfig",
    "imagefolder": "surd.sources.imagefolder:ImageFolderConfig",
    "parquet": "surd.sources.tabular:ParquetConfig",
    "jsonl": "surd.sources.tabular:JsonlConfig",
    "civitai": "surd.sources.civitai:CivitaiConfig",
    "diffusiondb": "surd.sources.diffusiondb:DiffusionDBConfig",
    "lexica": "surd.sources.lexica:LexicaConfig",
}
SOURCE_TYPES: tuple[str, ...] = tuple(_REGISTRY)


def source_config_model(kind: Any) -> Any:
    """The config class of source type `kind` (a RecipeError naming the known types when there is none)."""
    import importlib

    if kind not in _REGISTRY:
        raise RecipeError(f"collect: unknown source type {kind!r}; known: {', '.join(sorted(_REGISTRY))}")
    module, cls = _REGISTRY[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def source_config(raw: dict[str, Any]) -> Any:
    """Validate one `collect:` entry into its source's config model."""
    from pydantic import ValidationError

    kind = raw.get("type")
    model = source_config_model(kind)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        hint = f" (its options: surd collect {kind} --help)"
        raise RecipeError(explain_validation(e, f"collect[{kind}]") + hint) from None


def _type_name(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in args)
    if args and type(None) in args:  # `X | None`: the option may be left unset, which the default shows
        return " | ".join(_type_name(a) for a in args if a is not type(None))
    if args:
        return f"{getattr(typing.get_origin(annotation), '__name__', '')}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != {} else "none"


def source_help(kind: str, flags: dict[str, str] | None = None) -> str:
    """Every option of source `kind`: type, description, default or `required`; `flags` names their CLI flags."""
    model = source_config_model(kind)
    flags = flags or {}
    doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
    lines = [f"{kind} source" + (f": {doc}" if doc else ""), "",
             "Options (a recipe's collect: entry, or --option KEY=VALUE; some have their own flag, shown beside them):"]
    shared = ("name", "rows_per_shard")  # every source has them: listed last
    fields = [(n, f) for n, f in model.model_fields.items() if n != "type" and n not in shared]
    fields = sorted(fields, key=lambda item: not item[1].is_required()) + [(n, model.model_fields[n]) for n in shared]
    for name, field in fields:
        label = f"{name} ({flags[name]})" if name in flags else name
        if field.is_required():
            need = "required"
        else:
            need = "optional" if field.get_default(call_default_factory=True) is None else f"default: {_default(field)}"
        about = f"{field.description}; " if field.description else ""
        lines.append(f"  {label} <{_type_name(field.annotation)}>: {about}{need}")
    if model.ONE_OF:
        lines.append(f"  one of {', '.join(model.ONE_OF)} is required")
    return "\n".join(lines)
