"""The dataset card (`README.md`) of an exported SURD dataset, rendered by the HF hub."""

from __future__ import annotations

import json
from pathlib import Path

from surd import layout, shards
from surd.schema import COLUMNS, SCHEMA_VERSION

LICENCE_NOTE = (
    "Images and prompts come from the sources listed above and keep their original licences and terms "
    "(e.g. Civitai's terms of service, DiffusionDB's CC0 metadata, the original SURD release). Narrative "
    "prompts written by an LLM inherit that model's output terms. Check them before redistributing."
)


def _sources(run_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    collect = layout.stage_dir(run_dir, "collect")
    for stats in sorted((collect / "_stats").glob("*/")) if (collect / "_stats").is_dir() else []:
        total = sum(json.loads(p.read_text()).get("kept", 0) for p in stats.rglob("*.json"))
        counts[stats.name] = total
    return counts


def dataset_card(
    run_dir: Path, files: dict[str, list[str]], counts: dict[str, int], *, recipe_name: str, input_stage: str
) -> str:
    splits = [s for s in ("train", "test") if files.get(s)]
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in splits:
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
    lines += ["task_categories:", "- text-to-image", "license: other", "tags:", "- surd", "- sur-adapter", "---", ""]
    lines += [
        f"# SURD ({recipe_name})",
        "",
        "Triples of image, complex keyword prompt and simple narrative prompt, built with the `surd` toolkit "
        f"(schema version {SCHEMA_VERSION}; rows exported from the `{input_stage}` stage).",
        "",
        "| split | rows |",
        "|---|---|",
    ]
    lines += [f"| {split} | {counts.get(split, 0)} |" for split in ("train", "test")]
    lines += ["", "## Sources", "", "| source | rows collected |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in _sources(run_dir).items()]
    lines += ["", "## Columns", "", "| column | meaning |", "|---|---|"]
    lines += [f"| `{name}` | {doc} |" for name, _, doc in COLUMNS]
    lines += ["", "## What each stage dropped", ""]
    lines += ["| stage | in | kept | dropped | reasons |", "|---|---|---|---|---|"]
    for stage in layout.stages_present(run_dir):
        s = shards.stage_stats(layout.stage_dir(run_dir, stage))
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(s["dropped"].items())) or "-"
        lines.append(f"| {stage} | {s['in']} | {s['kept']} | {sum(s['dropped'].values())} | {reasons} |")
    lines += [
        "",
        "Dropped rows are kept, with `drop_stage` and `drop_reason`, under each stage's `dropped/` folder of the run.",
        "",
        "## Licences",
        "",
        LICENCE_NOTE,
        "",
    ]
    return "\n".join(lines)
