"""Every path of a run folder, spelled once. Everyone who reads or writes a run folder asks here.

    RUN/<stage>/...              one folder per stage in data-flow order (`STAGES`); inside it, the shard
                                 layout of `surd.shards` plus `_fingerprint.json` (what the stage was built from)
    RUN/surd/                    the exported dataset (HF hub layout: data/<split>-NNNNN-of-NNNNN.parquet, README.md)
    RUN/surd-imagefolder/        the original SURD layout (<split>/metadata.jsonl + images)
    RUN/reviews.parquet          reviewers' decisions pulled from Label Studio (applied by export)
    RUN/review/thumbs/           thumbnails served to Label Studio
    RUN/adapter/                 a recipe's training run (adapter.safetensors, checkpoints/, logs/, validation/)
    DATA/cache/                  content-keyed caches of a dataset folder (latents, text, teacher vectors)
    RUN/.surd-lock               the lock a writing command holds (its pid inside); it also marks a run folder
    RUN/.surd-trash-*/           stage folders being removed for a rebuild (renamed aside, then deleted)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# The data-flow order. `collect` writes one sub-folder per source; `export` writes RUN/surd.
STAGES: tuple[str, ...] = ("collect", "fetch", "clean", "dedup", "nsfw", "pair", "score", "export")

DATASET = "surd"
IMAGEFOLDER = "surd-imagefolder"
REVIEWS = "reviews.parquet"
THUMBS = Path("review") / "thumbs"
ADAPTER = "adapter"
CACHE = "cache"
FINGERPRINT = "_fingerprint.json"
LOCK = ".surd-lock"
TRASH_PREFIX = ".surd-trash-"
REPORT = "report.html"
RUN_VAR = "${out}"  # how recipes, and everything a run folder stores, spell the run folder itself


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage


def dataset_dir(run_dir: Path) -> Path:
    return Path(run_dir) / DATASET


def dataset_data_dir(run_dir: Path) -> Path:
    """The Parquet files of the exported dataset: RUN/surd/data."""
    return dataset_dir(run_dir) / "data"


def find_dataset(path: Path) -> Path | None:
    """The exported dataset for a run folder or a dataset folder itself (one holding data/*.parquet), or None."""
    path = Path(path)
    for candidate in (dataset_dir(path), path):
        if any((candidate / "data").glob("*.parquet")):
            return candidate
    return None


def imagefolder_dir(run_dir: Path) -> Path:
    return Path(run_dir) / IMAGEFOLDER


def reviews_path(run_dir: Path) -> Path:
    return Path(run_dir) / REVIEWS


def thumbs_dir(run_dir: Path) -> Path:
    return Path(run_dir) / THUMBS


def adapter_dir(run_dir: Path) -> Path:
    return Path(run_dir) / ADAPTER


def cache_dir(data: Path) -> Path:
    """Caches live in the folder given as the training data, shared by every run on it."""
    return Path(data) / CACHE


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK


def report_path(run_dir: Path) -> Path:
    return Path(run_dir) / REPORT


def stages_present(run_dir: Path) -> list[str]:
    """The stages of STAGES that have written statistics in this run folder, in data-flow order."""
    return [s for s in STAGES if (stage_dir(run_dir, s) / "_stats").is_dir()]


def portable(value: Any, run_dir: Path) -> Any:
    """`value` (strings, lists, dicts) with paths inside the run folder spelled `${out}/...`, as a recipe spells them.

    What a run folder stores about itself (fingerprints of settings) must not name where it lies today, or a copy
    of the run could not be resumed elsewhere. Paths outside the run stay as they are.
    """
    if isinstance(value, dict):
        return {k: portable(v, run_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, run_dir) for v in value]
    if not isinstance(value, str):
        return value
    run = Path(run_dir)
    for prefix in dict.fromkeys((str(run), os.path.abspath(run), str(run.resolve()))):
        if value == prefix or value.startswith(prefix.rstrip(os.sep) + os.sep):
            return RUN_VAR + value[len(prefix.rstrip(os.sep)):]
    return value
