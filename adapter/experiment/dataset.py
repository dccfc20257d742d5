"""The world's data: renders written as the original SURD imagefolder layout, built into a dataset by a recipe, and
the evaluation prompt sets.

    EXP/world/images/metadata.jsonl   {"file_name", "text": narrative, "prompt": raw keyword prompt, "attributes"}
    EXP/recipe.yaml                   imagefolder -> clean -> export (`surd run EXP/recipe.yaml --out EXP/run`)
    EXP/run/surd/                     the exported SURD dataset, the only data every model trains on
    EXP/prompts/{seen,held-out}.yaml  prompt sets for `surd eval --probes`: narrative, cleaned keyword prompt, truth

Only seen combinations are rendered into the dataset; held-out combinations appear in the held-out prompt set
only. `attributes` rides along in `gen_meta`, as any extra metadata field of the imagefolder source does.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

from adapter.experiment.prompts import keyword_prompt, narrative_prompt
from adapter.experiment.world import Attributes, cycle, render, split_combinations
from surd.shards import atomic_write_bytes

RECIPE = """\
# The `shapes` world's dataset, written by `surd experiment`: the renders go through the pipeline like any
# user's data (the imagefolder source, prompt cleaning, the export with its stable train/test split).
name: shapes
description: Rendered shapes with keyword and narrative prompts (surd experiment).
collect:
  - type: imagefolder
    path: {images}
    rows_per_shard: 1024
clean:
  min_side: 16
export:
  test_fraction: 0.05
"""


def write_images(folder: Path, n: int, seed: int) -> int:
    """`n` renders of seen combinations (each combination equally often) in the imagefolder layout."""
    import io

    rng = random.Random(seed)
    seen, _ = split_combinations()
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, attributes in enumerate(cycle(seen, n, rng)):
        name = f"{i:05d}.png"
        buffer = io.BytesIO()
        render(attributes, rng).save(buffer, format="PNG")
        atomic_write_bytes(folder / name, buffer.getvalue())
        lines.append(json.dumps({"file_name": name, "text": narrative_prompt(attributes, rng),
                                 "prompt": keyword_prompt(attributes, rng), "attributes": attributes}))
    atomic_write_bytes(folder / "metadata.jsonl", ("\n".join(lines) + "\n").encode())  # last: the folder is whole
    return n


def build_dataset(images: Path, recipe_path: Path, run: Path, progress: bool = False) -> dict[str, Any]:
    """Write the recipe and run it (collect -> clean -> export) into `run`; returns the dataset's row counts."""
    from adapter.recipe import ModelRecipe
    from pipelines.recipe import load_recipe
    from pipelines.run import run_recipe
    from surd import layout

    atomic_write_bytes(recipe_path, RECIPE.format(images=json.dumps(str(images.resolve()))).encode())
    spec = load_recipe(recipe_path, run, model=ModelRecipe)
    run.mkdir(parents=True, exist_ok=True)
    run_recipe(spec, run, progress=progress)
    dataset = layout.find_dataset(run)
    if dataset is None:
        raise RuntimeError(f"the recipe {recipe_path} exported no dataset into {run}")
    import pyarrow.parquet as pq

    splits: dict[str, int] = {}
    for path in sorted((dataset / "data").glob("*.parquet")):
        for split in pq.read_table(path, columns=["split"]).column("split").to_pylist():
            splits[split] = splits.get(split, 0) + 1
    return splits


def prompt_set(category: str, combos: list[Attributes], n: int, seed: int) -> dict[str, Any]:
    """`n` eval prompts over `combos` (each equally often): narrative, cleaned keyword prompt and the truth."""
    from surd.clean import clean_prompt

    rng = random.Random(seed)
    probes = []
    for i, attributes in enumerate(cycle(combos, n, rng)):
        probes.append({"id": f"{category}-{i:03d}", "prompt": narrative_prompt(attributes, rng),
                       "keyword_prompt": clean_prompt(keyword_prompt(attributes, rng)), "attributes": attributes})
    return {"category": category, "probes": probes}


def write_prompt_sets(folder: Path, n: int, seed: int) -> dict[str, Path]:
    """`seen.yaml` and `held-out.yaml`: `n` prompts each, for `surd eval --probes`."""
    seen, held_out = split_combinations()
    paths = {}
    for offset, (category, combos) in enumerate((("seen", seen), ("held-out", held_out))):
        path = folder / f"{category}.yaml"
        text = yaml.safe_dump(prompt_set(category, combos, n, seed + 1000 * (offset + 1)), sort_keys=False)
        atomic_write_bytes(path, text.encode())
        paths[category] = path
    return paths
