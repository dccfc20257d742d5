"""YAML recipes, validated by pydantic. A bad recipe names the file and the bad key.

    name: demo
    prepare: {demo_data: "${out}/demo-images", tiny_models: "${out}/models"}   # optional
    collect: [{type: folder, path: "${out}/demo-images"}]
    clean: {min_side: 64}
    dedup: {phash_threshold: 6}
    export: {test_fraction: 0.1}
    train: {...}                                                                 # optional

`${out}` in any string is replaced by the run folder. A stage runs when its section is present
(`clean: {}` runs it with defaults); `collect` and `export` always run. The model sections (`train:`,
`generate:`, `eval:`) are typed by `adapter.recipe.ModelRecipe`, a subclass the CLI loads with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.export import ExportConfig
from pipelines.registry import PROCESSING_STAGES, stage_config
from surd.errors import RecipeError, explain_validation
from surd.sources import source_config


class Prepare(BaseModel):
    model_config = ConfigDict(extra="forbid")

    demo_data: str | None = Field(None, description="generate the offline demo images here if missing")
    tiny_models: str | None = Field(None, description="write tiny random models here if missing")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "surd"
    description: str = ""
    prepare: Prepare = Field(default_factory=Prepare)
    collect: list[dict[str, Any]]
    fetch: dict[str, Any] | None = None
    clean: dict[str, Any] | None = None
    dedup: dict[str, Any] | None = None
    nsfw: dict[str, Any] | None = None
    pair: dict[str, Any] | None = None
    score: dict[str, Any] | None = None
    export: ExportConfig = Field(default_factory=ExportConfig)
    # Typed by the adapter package's subclass (`adapter.recipe.ModelRecipe`); kept as data at this floor.
    train: Any = None
    generate: Any = None
    eval: Any = None

    def sources(self) -> list[Any]:
        return [source_config(entry) for entry in self.collect]

    def stages(self) -> list[tuple[str, Any]]:
        """(name, validated config) of each processing stage present, in data-flow order."""
        return [(name, stage_config(name, getattr(self, name))) for name in PROCESSING_STAGES
                if getattr(self, name) is not None]


def _substitute(value: Any, out: str) -> Any:
    if isinstance(value, str):
        return value.replace("${out}", out)
    if isinstance(value, list):
        return [_substitute(v, out) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, out) for k, v in value.items()}
    return value


def load_recipe(path: Path, out: Path, model: type[Recipe] = Recipe) -> Recipe:
    """Read, substitute and validate a recipe as `model`, checking every section (sources and stages) up front."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe is a folder, not a YAML file: {path}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file (a recipe is YAML)") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with at least a `collect:` list")
    try:
        recipe = model.model_validate(_substitute(raw, str(out)))
    except ValidationError as e:
        raise RecipeError(explain_validation(e, str(path))) from None
    try:
        recipe.sources()
        recipe.stages()
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    return recipe
