"""The dataset card (`README.md`) of an exported SURD dataset, rendered by the HF hub.

Its YAML header is what the hub and `datasets` read: `configs` (the splits' files), `pretty_name`,
`size_categories`, and `dataset_info` (features, and each split's rows and bytes). Its text says how to load the
data, which models, templates and thresholds built it (`surd.runinfo`), what each stage dropped, how to cite the
paper, and the licences.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from surd import layout, runinfo, shards
from surd.schema import COLUMNS, SCHEMA_VERSION

LICENCE_NOTE = (
    "Images and prompts come from the sources listed above and keep their original licences and terms "
    "(e.g. Civitai's terms of service, DiffusionDB's CC0 metadata, the original SURD release). Narrative "
    "prompts written by an LLM inherit that model's output terms. Check them before redistributing."
)
# The authors' own entry (Qrange-group/SUR-adapter README), with the third author's name spelled as in the paper.
CITATION = """@inproceedings{zhong2023adapter,
  title         = {{SUR}-adapter: Enhancing Text-to-Image Pre-trained Diffusion Models with Large Language Models},
  author        = {Zhong, Shanshan and Huang, Zhongzhan and Wen, Wushao and Qin, Jinghui and Lin, Liang},
  booktitle     = {Proceedings of the 31st ACM International Conference on Multimedia},
  series        = {MM '23},
  pages         = {567--578},
  year          = {2023},
  publisher     = {ACM},
  eprint        = {2305.05189},
  archivePrefix = {arXiv},
}"""
LOAD_PATH = "path/to/surd"  # the placeholder the loading snippet names
# The hub's size buckets: (upper bound, name); a count below the bound falls in it.
SIZE_CATEGORIES = [(10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
                   (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B")]
_DTYPES = {pa.string(): "string", pa.int32(): "int32", pa.uint64(): "uint64", pa.float32(): "float32"}


def size_category(rows: int) -> str:
    """The hub's `size_categories` bucket for a number of rows."""
    return next((name for bound, name in SIZE_CATEGORIES if rows < bound), "n>1B")


def dataset_info(files: dict[str, list[str]], counts: dict[str, int], data_dir: Path | None) -> dict[str, Any]:
    """The `dataset_info` block: features as `datasets` writes them, rows and bytes of each split."""
    features: list[dict[str, Any]] = []
    for name, typ, _ in COLUMNS:
        if name == "image":
            features.append({"name": name, "dtype": "image"})
        elif pa.types.is_list(typ):
            features.append({"name": name, "sequence": _DTYPES[typ.value_type]})
        else:
            features.append({"name": name, "dtype": _DTYPES[typ]})
    splits, download = [], 0
    for split in ("train", "test"):
        if not files.get(split):
            continue
        paths = [data_dir / name for name in files[split]] if data_dir is not None else []
        metas = [pq.read_metadata(p) for p in paths]
        size = sum(m.row_group(g).total_byte_size for m in metas for g in range(m.num_row_groups))
        download += sum(p.stat().st_size for p in paths)
        splits.append({"name": split, "num_bytes": size, "num_examples": counts.get(split, 0)})
    return {"features": features, "splits": splits, "download_size": download,
            "dataset_size": sum(s["num_bytes"] for s in splits)}


def _header(run_dir: Path, files: dict[str, list[str]], counts: dict[str, int], recipe_name: str,
            data_dir: Path | None) -> str:
    splits = [s for s in ("train", "test") if files.get(s)]
    header = {
        "configs": [{"config_name": "default",
                     "data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits]}],
        "pretty_name": f"SURD ({recipe_name})",
        "size_categories": [size_category(sum(counts.values()))],
        "task_categories": ["text-to-image"],
        "license": "other",
        "tags": ["surd", "sur-adapter"],
        "dataset_info": dataset_info(files, counts, data_dir),
    }
    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n"


def _sources(run_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    collect = layout.stage_dir(run_dir, "collect")
    for stats in sorted((collect / "_stats").glob("*/")) if (collect / "_stats").is_dir() else []:
        total = sum(json.loads(p.read_text()).get("kept", 0) for p in stats.rglob("*.json"))
        counts[stats.name] = total
    return counts


def _built_with(run_dir: Path, data_files: list[Path]) -> list[str]:
    """Models (as the rows name them and as the stages recorded them), templates and thresholds."""
    lines = ["## How it was built", ""]
    used = runinfo.row_models(data_files)
    settings = runinfo.stage_settings(run_dir)
    chosen = runinfo.models_and_thresholds(settings)
    templates = sorted({m.group(1) for origin in used["narrative_origin"]
                        for m in [re.search(r"@([\w.-]+)", origin)] if m})
    lines += ["| what | value | rows |", "|---|---|---|"]
    lines += [f"| narrative written by | `{origin}` | {n} |" for origin, n in used["narrative_origin"].most_common()]
    lines += [f"| CLIP model | `{model}` | {n} |" for model, n in used["clip_model"].most_common()]
    lines += [f"| prompt template | `{t}` (`surd/templates/{t}.yaml` when bundled) | |" for t in templates]
    models = [(stage, key, value) for stage, kind, key, value in chosen if kind == "model"]
    lines += [f"| {stage} `{key}` | `{value}` | |" for stage, key, value in models]
    thresholds = [(stage, key, value) for stage, kind, key, value in chosen if kind == "threshold"]
    if thresholds:
        lines += ["", "Thresholds:", "", "| stage | setting | value |", "|---|---|---|"]
        lines += [f"| {stage} | `{key}` | {value} |" for stage, key, value in thresholds]
    elif not settings:
        lines += ["", "The stages recorded no settings (a run made by an earlier surd): the models above are the ones "
                  "the rows name."]
    shared = runinfo.shared_narratives(data_files)
    if shared:
        rows = sum(len(p) for _, p in shared)
        what = "1 narrative prompt is" if len(shared) == 1 else f"{len(shared)} narrative prompts are"
        lines += ["", f"{what} shared by {rows} rows with different keyword prompts (listed, with their images, in "
                  "the run report: `surd report RUN`)."]
    return lines + [""]


def loading_snippet() -> list[str]:
    return [
        "## Loading", "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'surd = load_dataset("{LOAD_PATH}")  # this folder, or its hub repo id once uploaded',
        'row = surd["train"][0]',
        'row["image"], row["keyword_prompt"], row["narrative_prompt"]  # a PIL image and the two prompts',
        "```", "",
    ]


def dataset_card(
    run_dir: Path, files: dict[str, list[str]], counts: dict[str, int], *, recipe_name: str, input_stage: str,
    data_dir: Path | None = None,
) -> str:
    """The card's text; `data_dir` holds the split files (`files`), for their sizes and the models they name."""
    data_files = [data_dir / name for split in ("train", "test") for name in files.get(split, [])] if data_dir else []
    lines = [_header(run_dir, files, counts, recipe_name, data_dir)]
    lines += [
        f"# SURD ({recipe_name})",
        "",
        "Triples of image, complex keyword prompt and simple narrative prompt, built with the `surd` toolkit "
        f"(schema version {SCHEMA_VERSION}; rows exported from the `{input_stage}` stage) for training a "
        "SUR-adapter (Zhong et al., ACM MM 2023).",
        "",
        "| split | rows |",
        "|---|---|",
    ]
    lines += [f"| {split} | {counts.get(split, 0)} |" for split in ("train", "test")]
    lines += [""] + loading_snippet() + _built_with(run_dir, data_files)
    lines += ["## Sources", "", "| source | rows collected |", "|---|---|"]
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
        "## Citation",
        "",
        "The SUR-adapter paper, which introduced SURD:",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
        "## Licences",
        "",
        LICENCE_NOTE,
        "",
    ]
    return "\n".join(lines)
