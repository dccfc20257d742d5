"""A recipe with its model sections typed: `train:`, `generate:` and `eval:` are validated when the recipe is
loaded, so a typo in `train:` stops the run before any data work, not hours later."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from adapter.config import EvalConfig, GenerateConfig, TrainConfig
from pipelines.recipe import Recipe


class RecipeEval(EvalConfig):
    """A recipe's `eval:`: base and adapter default to the recipe's `train:` base and its trained adapter."""

    base: str | None = Field(None, description="default: train.base")  # type: ignore[assignment]
    adapter: Path | None = Field(None, description="default: the adapter the recipe trains")  # type: ignore[assignment]


class ModelRecipe(Recipe):
    """`pipelines.recipe.Recipe` plus typed model sections."""

    train: TrainConfig | None = None
    generate: GenerateConfig | None = None
    eval: RecipeEval | None = None
