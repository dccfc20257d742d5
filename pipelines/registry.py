"""Stage registry: the fixed data-flow order and each stage's config model.

Each entry is "module:ConfigClass", a `surd.rows.StageConfig` subclass whose `build()` returns the
processor. `collect` (sources) and `export` (final shards) are run by their own modules.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import ValidationError

from surd.errors import RecipeError, explain_validation

PROCESSING_STAGES: dict[str, str] = {
    "fetch": "surd.fetch:FetchConfig",
    "clean": "surd.clean:CleanConfig",
    "dedup": "surd.dedup:DedupConfig",
    "nsfw": "surd.nsfw:NsfwConfig",
    "pair": "surd.pair:PairConfig",
    "score": "surd.score:ScoreConfig",
}


def config_model(stage: str) -> Any:
    module, cls = PROCESSING_STAGES[stage].split(":")
    return getattr(importlib.import_module(module), cls)


def stage_config(stage: str, raw: dict[str, Any] | None) -> Any:
    """Validate a stage's recipe section (None: all defaults)."""
    if stage not in PROCESSING_STAGES:
        raise RecipeError(f"unknown stage {stage!r}; known: {', '.join(PROCESSING_STAGES)}")
    try:
        return config_model(stage).model_validate(raw or {})
    except ValidationError as e:
        raise RecipeError(explain_validation(e, stage)) from None
