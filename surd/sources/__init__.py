"""Source registry: `type` in a recipe's `collect:` list -> (config model, builder).

Each source module defines a pydantic config with a `type: Literal[...]` field and a class built from it;
add one line per source to `_REGISTRY` below.
"""

from __future__ import annotations

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


def source_config(raw: dict[str, Any]) -> Any:
    """Validate one `collect:` entry into its source's config model."""
    import importlib

    from pydantic import ValidationError

    kind = raw.get("type")
    if kind not in _REGISTRY:
        raise RecipeError(f"collect: unknown source type {kind!r}; known: {', '.join(sorted(_REGISTRY))}")
    module, cls = _REGISTRY[kind].split(":")
    model = getattr(importlib.import_module(module), cls)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(explain_validation(e, f"collect[{kind}]")) from None
