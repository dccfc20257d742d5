"""Train the SUR-adapter on SURD shards with `accelerate` (one process, or many with `accelerate launch`).

The frozen UNet, VAE and text encoder stay in the weight dtype (fp16/bf16 under mixed precision); the
adapter and its LLM projection train in fp32. Run folder layout:

    <out>/train_config.json                 the validated TrainConfig
    <out>/checkpoints/checkpoint-NNNNNNN/    `accelerator.save_state` (+ train_state.json); `--resume latest`
    <out>/logs/losses.csv, logs/adapter/     every loss term per optimiser step (CSV and TensorBoard)
    <out>/validation/step-NNNNNNN.png        base | adapter, same seed, one row per validation prompt
    <out>/adapter.safetensors, adapter_config.json   the result
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adapter.config import LossSettings, TrainConfig
from adapter.data import (
    AdapterDataset,
    EpochBatches,
    build_latent_cache,
    build_text_cache,
    collate,
    dataset_revision,
    latent_cache,
    latent_key,
    latent_params,
    read_samples,
    resolve_dataset,
    sample_latents,
    text_cache,
    text_embeds,
)
from adapter.losses import align_loss, diffusion_loss, diffusion_target, distill_loss
from adapter.model import SURAdapter
from adapter.teacher import build_teacher_cache
from surd import layout
from surd.errors import SurdError
from surd.models import resolve_device, resolve_precision
from surd.shards import atomic_write_json

LOSS_TERMS = ["loss", "diffusion", "llm", "prompt"]


def default_cache_dir(data: Path) -> Path:
    """Caches live in the folder given as --data, shared by every training run on it (and `surd teacher`)."""
    return layout.cache_dir(data)


def find_checkpoint(out: Path, resume: str) -> Path | None:
    """`latest` -> the highest-step checkpoint in <out>/checkpoints (None if none); else that folder."""
    if resume != "latest":
        path = Path(resume)
        if not (path / "train_state.json").is_file():
            raise SurdError(f"--resume {resume}: not a checkpoint folder (no train_state.json)")
        return path
    done = [p for p in (out / "checkpoints").glob("checkpoint-*") if (p / "train_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _step_seed(seed: int, micro_batch: int, rank: int) -> int:
    """All per-step randomness (noise, timesteps, latent samples, dropout) derives from this: resume is exact."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{micro_batch}/{rank}".encode()).digest()[:7], "big")


def _text(batch: dict[str, Any], prefix: str, frozen: Any) -> tuple[torch.Tensor, torch.Tensor]:
    mask = batch[f"{prefix}_mask"].to(frozen.device)
    if f"{prefix}_embeds" in batch:
        return batch[f"{prefix}_embeds"].to(frozen.device), mask
    with torch.no_grad():
        return text_embeds(frozen.text_encoder, batch[f"{prefix}_ids"], mask), mask


def compute_losses(batch: dict[str, Any], adapter: torch.nn.Module, frozen: Any, noise_scheduler: Any,
                   loss: LossSettings, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One micro-batch: every loss term, with the adapter's output flowing through the frozen UNet."""
    device, dtype = frozen.device, frozen.unet.dtype
    if "latent_params" in batch:
        params = batch["latent_params"].to(device)
    else:  # recompute the VAE every step, as the original does (same math as the cached path)
        with torch.no_grad():
            params = latent_params(frozen.vae, batch["pixel_values"])
    latents = sample_latents(params, frozen.vae.config, generator)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    if loss.noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=device)
        noise = noise + loss.noise_offset * offset
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)

    narrative, narrative_mask = _text(batch, "narrative", frozen)
    parts = adapter(narrative.float(), mask=narrative_mask, return_parts=True)
    # A dtype cast keeps the graph (the original re-wrapped with torch.tensor(), which detached it).
    pred = frozen.unet(noisy.to(dtype), timesteps, encoder_hidden_states=parts.output.to(dtype)).sample
    terms = {"diffusion": diffusion_loss(pred, target, timesteps, noise_scheduler, loss.snr_gamma)}
    total = terms["diffusion"]
    if loss.llm_weight > 0:
        terms["llm"] = distill_loss(parts.projected, batch["teacher"].to(device), loss.llm_loss, loss.temperature)
        total = total + loss.llm_weight * terms["llm"]
    if loss.prompt_weight > 0:
        keyword, keyword_mask = _text(batch, "keyword", frozen)
        terms["prompt"] = align_loss(parts.output, narrative_mask, keyword, keyword_mask, loss.prompt_loss,
                                     loss.temperature)
        total = total + loss.prompt_weight * terms["prompt"]
    terms["loss"] = total
    return terms


def build_adapter(config: TrainConfig, dim: int, llm_dim: int | None) -> SURAdapter:
    torch.manual_seed(config.seed)
    return SURAdapter(dim, llm_dim=llm_dim, **config.adapter.model_dump())


def prepare_frozen(pipe: Any, device: torch.device, checkpointing: bool) -> Any:
    """Freeze the pipeline's models (loaded in the weight dtype); SDPA attention; UNet gradient checkpointing."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    return pipe


def _flat(config: TrainConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.model_dump().items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            name = f"{key}.{sub}" if sub else key
            flat[name] = v if isinstance(v, int | float | str | bool) else json.dumps(v)
    return flat


class _CsvLog:
    """losses.csv, one row per optimiser step; on resume, rows past the checkpoint are dropped first."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if path.exists() and resume_step > 0:
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "lr", *LOSS_TERMS])
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=["step", "lr", *LOSS_TERMS]).writerow(row)


def train(config: TrainConfig, on_step: Callable[[int, dict[str, float]], None] | None = None,
          progress: bool = True) -> Path:
    """Run (or resume) a training run; returns the run folder holding adapter.safetensors."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    if not config.data or not config.out:
        raise SurdError("train needs --data and --out (train.data / train.out in a recipe)")
    if config.loss.llm_weight > 0 and not config.llm:
        raise SurdError("train.loss.llm_weight > 0 needs a teacher: pass --llm (or set loss.llm_weight: 0)")
    out = Path(config.out)
    precision = config.mixed_precision
    if precision == "auto":
        chosen = resolve_precision("auto", resolve_device("auto"))
        precision = "no" if chosen == "fp32" else chosen  # accelerate calls fp32 "no"
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=config.gradient_accumulation,
        log_with="tensorboard" if config.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    try:
        return _train(config, accelerator, out, on_step, progress)
    finally:
        accelerator.end_training()
        # Free the shared accelerate state, so a later run in this process may pick other settings.
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _train(config: TrainConfig, accelerator: Any, out: Path, on_step: Callable | None, progress: bool) -> Path:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from adapter.inference import compare, load_pipeline

    data_dir = resolve_dataset(Path(config.data))
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir(Path(config.data))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "train_config.json", config.model_dump())

    pipe = prepare_frozen(load_pipeline(config.base, dtype=weight_dtype), device, config.gradient_checkpointing)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    need_keyword = config.loss.prompt_weight > 0
    flips = [False, True] if config.random_flip else [False]
    latents = latent_cache(cache_dir, pipe.vae, config.base, config.resolution) if config.cache_latents else None
    samples = read_samples(data_dir, config.split, config.max_samples,
                           keep_image=lambda s: latents is None or any(latent_key(s, f) not in latents for f in flips))

    teacher, llm_dim = None, None
    with accelerator.main_process_first():  # rank 0 builds the caches, the others then find them complete
        if config.loss.llm_weight > 0:
            teacher, _ = build_teacher_cache(
                [(s.id, s.narrative) for s in samples], cache_dir, config.llm, config.layer, config.pooling,
                device=device, batch_size=config.teacher_batch_size, keep_tokens=config.keep_teacher_tokens,
                dtype=config.teacher_dtype)
            llm_dim = int(teacher.info["hidden_size"])
        texts = None
        if latents is not None:
            build_latent_cache(latents, pipe.vae, samples, config.resolution, flips, config.batch_size)
        if config.cache_text:
            texts = text_cache(cache_dir, pipe.text_encoder, config.base)
            items = [(s.id, s.narrative) for s in samples]
            items += [(s.id, s.keyword) for s in samples] if need_keyword else []
            build_text_cache(texts, pipe.tokenizer, pipe.text_encoder, items)
    if latents is not None:
        for s in samples:
            s.image = None  # the cache has them now; don't hold every image in memory

    dataset = AdapterDataset(samples, seed=config.seed, resolution=config.resolution, center_crop=config.center_crop,
                             random_flip=config.random_flip, tokenizer=pipe.tokenizer, latents=latents, texts=texts,
                             teacher=teacher, need_keyword=need_keyword)
    batches = EpochBatches(len(dataset), config.batch_size, config.seed, accelerator.process_index,
                           accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                         num_workers=config.dataloader_workers)

    adapter = build_adapter(config, int(pipe.text_encoder.config.hidden_size), llm_dim)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay,
                                  eps=config.adam_epsilon)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_steps * accelerator.num_processes)
    adapter, optimizer, lr_scheduler = accelerator.prepare(adapter, optimizer, lr_scheduler)

    step = 0
    checkpoint = find_checkpoint(out, config.resume) if config.resume else None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        step = json.loads((checkpoint / "train_state.json").read_text())["step"]
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    micro = step * config.gradient_accumulation
    batches.start_at(micro)  # the exact next sample, not the start of the epoch

    csv_log = _CsvLog(out / "logs" / "losses.csv", step) if main else None
    if config.tensorboard:
        accelerator.init_trackers("adapter", config=_flat(config))
    prompts = config.validation_prompts or [s.narrative for s in read_samples(data_dir, "test", 2)] or \
        [s.narrative for s in samples[:2]]
    generator = torch.Generator(device=device)
    bar = tqdm(total=config.max_steps, initial=step, disable=not (progress and main), desc="train")
    running = dict.fromkeys(LOSS_TERMS, 0.0)
    adapter.train()
    for batch in loader:
        if step >= config.max_steps:
            break
        seed = _step_seed(config.seed, micro, accelerator.process_index)
        generator.manual_seed(seed)
        torch.manual_seed(seed)
        with accelerator.accumulate(adapter):
            terms = compute_losses(batch, adapter, pipe, noise_scheduler, config.loss, generator)
            accelerator.backward(terms["loss"])
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(adapter.parameters(), config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        for key, value in terms.items():
            running[key] += accelerator.gather(value.detach().float()).mean().item() / config.gradient_accumulation
        micro += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        row = {"step": step, "lr": lr_scheduler.get_last_lr()[0], **{k: running[k] for k in LOSS_TERMS}}
        running = dict.fromkeys(LOSS_TERMS, 0.0)
        accelerator.log({f"loss/{k}": row[k] for k in LOSS_TERMS} | {"lr": row["lr"]}, step=step)
        if csv_log is not None:
            csv_log.write(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            _save_checkpoint(accelerator, out, step, config.checkpoints_keep)
        if config.validation_every and (step % config.validation_every == 0 or step == config.max_steps) and main:
            image = compare(pipe, accelerator.unwrap_model(adapter), prompts, seed=config.seed,
                            steps=config.validation_steps, guidance_scale=config.guidance_scale)
            (out / "validation").mkdir(parents=True, exist_ok=True)
            image.save(out / "validation" / f"step-{step:07d}.png")
            adapter.train()
        if on_step is not None:
            on_step(step, row)
    bar.close()

    accelerator.wait_for_everyone()
    if main:
        extra = {
            "base_model": config.base,
            "text_dim": int(pipe.text_encoder.config.hidden_size),
            "teacher": {"model": config.llm, "layer": config.layer, "pooling": config.pooling,
                        "hidden_size": llm_dim} if llm_dim else None,
            "loss": config.loss.model_dump(),
            "steps": step,
            "seed": config.seed,
            "surd": dataset_revision(data_dir),
        }
        accelerator.unwrap_model(adapter).save(out, extra)
    return out


def _save_checkpoint(accelerator: Any, out: Path, step: int, keep: int) -> None:
    folder = out / "checkpoints" / f"checkpoint-{step:07d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        # train_state.json last: a folder without it is an interrupted save and is never resumed from.
        atomic_write_json(folder / "train_state.json", {"step": step})
        done = sorted((p for p in folder.parent.glob("checkpoint-*") if (p / "train_state.json").is_file()),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
