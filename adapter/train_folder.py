"""One training folder holds one run. Before any work, `plan` decides what `surd train` does with `--out`:

    out empty or missing                         train from step 0
    --overwrite                                  clear it (only a training folder), train from step 0
    neither --resume nor --overwrite, not empty  refused: another run's checkpoints would be resumed later, its
                                                 logs mixed with this one's
    --resume latest | auto                       the run's identity (every setting that shapes the weights, and the
                                                 dataset revision) must match the one recorded in run.json:
        same identity, adapter complete          nothing to train
        same identity, a checkpoint              resume it (says which, at which step)
        same identity, no checkpoint             train from step 0 (says so)
        another identity                         latest: refused, naming what changed; auto (recipes): cleared and
                                                 retrained from step 0, naming what changed
    --resume CHECKPOINT                          resume that folder

`max_steps` may grow on resume (continue a run further); any other change of identity is another run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapter.cache import fingerprint
from adapter.config import TrainConfig
from adapter.model import CONFIG_NAME, WEIGHTS_NAME
from surd.errors import SurdError
from surd.shards import atomic_write_json

IDENTITY_NAME = "run.json"
# Settings that never change the trained weights: where things go, how often to save or look, logging, and memory
# or pacing knobs (gradient checkpointing recomputes the same activations).
RUN_KEYS = frozenset({"data", "out", "resume", "overwrite", "checkpoint_every", "checkpoints_keep", "validation_every",
                      "validation_prompts", "validation_steps", "guidance_scale", "cache_dir", "dataloader_workers",
                      "teacher_batch_size", "report_to", "gradient_checkpointing"})
RESUMABLE = frozenset({"max_steps"})  # may change between a run and its resumption
# What only a training run writes: --overwrite and auto clear a folder holding one of these, never another folder.
RUN_MARKERS = ("train_config.json", IDENTITY_NAME, CONFIG_NAME)


def identity(config: TrainConfig, revision: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: the weight-shaping settings and the dataset (not its path)."""
    settings = {k: v for k, v in config.model_dump(mode="json").items() if k not in RUN_KEYS}
    return {"settings": settings, "data": {k: v for k, v in revision.items() if k != "path"}}


def identity_fingerprint(run: dict[str, Any], resumable: bool = False) -> str:
    """The identity's hash; `resumable`: without the settings a resumed run may change (one name for a run and
    its resumptions, e.g. its W&B run id)."""
    if resumable:
        run = {**run, "settings": {k: v for k, v in run["settings"].items() if k not in RESUMABLE}}
    return fingerprint(run)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(old: dict[str, Any], new: dict[str, Any], ignore: frozenset[str] = frozenset()) -> list[str]:
    """`key old -> new` for every setting or dataset property that differs (dataset keys prefixed `data.`)."""
    a, b = _flat(old), _flat(new)
    changed = []
    for key in sorted(set(a) | set(b)):
        if key.removeprefix("settings.") in ignore or a.get(key) == b.get(key):
            continue
        name = key.removeprefix("settings.")
        changed.append(f"{name} {a.get(key, '(unset)')} -> {b.get(key, '(unset)')}")
    return changed


def read_identity(out: Path) -> dict[str, Any] | None:
    path = out / IDENTITY_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_identity(out: Path, run: dict[str, Any]) -> None:
    atomic_write_json(out / IDENTITY_NAME, run)


def find_checkpoint(out: Path, resume: str) -> Path | None:
    """`latest` -> the highest-step checkpoint in <out>/checkpoints (None if none); else that folder."""
    if resume not in ("latest", "auto"):
        path = Path(resume)
        if not (path / "train_state.json").is_file():
            raise SurdError(f"--resume {resume}: not a checkpoint folder (no train_state.json)")
        return path
    done = [p for p in (out / "checkpoints").glob("checkpoint-*") if (p / "train_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def checkpoint_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "train_state.json").read_text())["step"])


def is_complete(out: Path, run: dict[str, Any]) -> bool:
    """The adapter in `out` was trained to the end with exactly this identity (max_steps included)."""
    try:
        saved = json.loads((out / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (out / WEIGHTS_NAME).is_file() and saved.get("run_fingerprint") == identity_fingerprint(run)


def describe(out: Path) -> str:
    """What a folder holds, in a few words (for the refusal)."""
    entries = sorted(p.name for p in out.iterdir())
    if not any((out / m).exists() for m in RUN_MARKERS):
        more = ", ..." if len(entries) > 4 else ""
        return f"{len(entries)} entries, not a training run: {', '.join(entries[:4])}{more}"
    parts = []
    if (out / WEIGHTS_NAME).is_file():
        parts.append(WEIGHTS_NAME)
    checkpoints = [p for p in (out / "checkpoints").glob("checkpoint-*") if (p / "train_state.json").is_file()]
    if checkpoints:
        parts.append(f"{len(checkpoints)} checkpoint{'s' if len(checkpoints) > 1 else ''}")
    return "another training run" + (f": {', '.join(parts)}" if parts else "")


@dataclass
class Plan:
    """What training does with its folder."""

    action: Literal["train", "resume", "skip"]
    message: str | None = None
    checkpoint: Path | None = None
    clear: bool = False


def _training_folder(out: Path, what: str) -> None:
    if not any((out / m).exists() for m in RUN_MARKERS):
        raise SurdError(f"{what}: --out {out} holds {describe(out)}; it clears only a training folder "
                        "(choose another --out)")


def plan(config: TrainConfig, run: dict[str, Any]) -> Plan:
    """Decide, before any work, whether to train from step 0, resume, skip, or refuse (see the module doc)."""
    out = Path(config.out or "")
    if out.exists() and not out.is_dir():
        raise SurdError(f"--out {out}: a file, not a folder")
    resume = config.resume
    if config.overwrite and resume:
        raise SurdError("--overwrite clears the folder that --resume would continue: give one of them")
    empty = not out.is_dir() or not any(out.iterdir())
    if empty:
        said = f"--resume {resume}: {out} holds no run yet: training from step 0" if resume == "latest" else None
        return Plan("train", said)
    if config.overwrite:
        _training_folder(out, "--overwrite")
        return Plan("train", f"--overwrite: cleared {out}", clear=True)
    if not resume:
        raise SurdError(f"--out {out} is not empty ({describe(out)}): --resume latest continues that run, "
                        "--overwrite clears it, or choose another --out")
    if resume not in ("latest", "auto"):
        checkpoint = find_checkpoint(out, resume)
        return Plan("resume", f"resuming from {checkpoint} (step {checkpoint_step(checkpoint)})", checkpoint)
    _training_folder(out, f"--resume {resume}")
    saved = read_identity(out)
    changed = ["(no record of the settings it was trained with)"] if saved is None else \
        differences(saved, run, ignore=RESUMABLE)
    if changed:
        if resume == "auto":
            return Plan("train", f"{out}: training settings or data changed ({'; '.join(changed)}): "
                                 "retraining from step 0", clear=True)
        raise SurdError(f"--resume {resume}: {out} holds a run with other settings or data ({'; '.join(changed)}): "
                        "--overwrite retrains there from step 0, or choose another --out")
    if is_complete(out, run):
        steps = json.loads((out / CONFIG_NAME).read_text()).get("steps")
        return Plan("skip", f"{out}: the adapter is complete for these settings and data (step {steps}): "
                            "nothing to train")
    checkpoint = find_checkpoint(out, "latest")
    if checkpoint is None:
        return Plan("train", f"--resume {resume}: no checkpoint in {out / 'checkpoints'}: training from step 0 "
                             "(the folder's earlier files cleared)", clear=True)
    return Plan("resume", f"resuming {out} from {checkpoint.name} (step {checkpoint_step(checkpoint)})", checkpoint)


def clear(out: Path) -> None:
    """Empty a training folder (the folder itself stays)."""
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
