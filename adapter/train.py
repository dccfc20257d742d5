"""Train an adapter of any kind (`adapter.kind`) on SURD shards with `accelerate` (one process, or many with
`accelerate launch`), on Stable Diffusion 1.x/2.x or SDXL.

The frozen UNet, VAE and text encoder(s) stay in the weight dtype (bf16/fp16 under mixed precision); the
adapter and its projections train in fp32. One micro-batch's math is adapter/step.py. Run folder layout:

    <out>/train_config.json                 the validated TrainConfig
    <out>/run.json                          what makes it this run: weight-shaping settings, dataset revision
                                            (adapter/train_folder.py: refuse, resume, skip or clear --out)
    <out>/checkpoints/checkpoint-NNNNNNN/    `accelerator.save_state` (+ ema.safetensors, train_state.json last)
    <out>/logs/losses.csv, logs/adapter/     every loss term per optimiser step (CSV and TensorBoard)
    <out>/validation/step-NNNNNNN.png        base | adapter (<kind>), same seed, a labelled row per prompt
    <out>/adapter.safetensors, adapter_config.json   the result
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adapter.config import REFERENCE, TrainConfig
from adapter.data import (
    AdapterDataset,
    EpochBatches,
    build_latent_cache,
    build_text_cache,
    collate,
    dataset_revision,
    latent_cache,
    latent_key,
    read_samples,
    resolve_dataset,
    text_cache,
)
from adapter.ema import EMA
from adapter.kinds import LLMBatch, build
from adapter.step import EmptyPrompt, compute_losses, prepare_frozen
from adapter.teacher import build_teacher_cache, tokens_key
from adapter.text import PromptEncoder
from adapter.train_folder import (
    Plan,
    checkpoint_step,
    clear,
    find_checkpoint,
    identity,
    identity_fingerprint,
    plan,
    write_identity,
)
from pipelines.progress import progress_bar
from surd import layout
from surd.errors import SurdError
from surd.models import precision_dtype, resolve_device, resolve_precision
from surd.shards import atomic_write_json

__all__ = ["build_adapter", "compute_losses", "find_checkpoint", "prepare_frozen", "train", "training_plan"]
LOSS_TERMS = ["loss", "diffusion", "llm", "prompt"]


def default_cache_dir(data: Path) -> Path:
    """Caches live in the folder given as --data, shared by every training run on it (and `surd teacher`)."""
    return layout.cache_dir(data)


def _step_seed(seed: int, micro_batch: int, rank: int) -> int:
    """All per-step randomness (noise, timesteps, latent samples, dropout) derives from this: resume is exact."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{micro_batch}/{rank}".encode()).digest()[:7], "big")


def build_adapter(config: TrainConfig, dim: int, llm_dim: int | None, pooled_dim: int | None = None) -> Any:
    """The adapter `config.adapter.kind` names, initialised from `config.seed`."""
    torch.manual_seed(config.seed)
    return build(config.adapter, dim, llm_dim, pooled_dim)


def check_config(config: TrainConfig) -> None:
    """Stop before any data work on settings that cannot train."""
    kind, loss = config.adapter.kind, config.loss
    if not config.data or not config.out:
        raise SurdError("train needs --data and --out (train.data / train.out in a recipe)")
    if kind == "connector" and not config.llm:
        raise SurdError("adapter.kind=connector reads the LLM's token states: pass --llm")
    if loss.llm_weight > 0 and not config.llm:
        raise SurdError("train.loss.llm_weight > 0 needs a teacher: pass --llm (or set loss.llm_weight: 0)")
    if kind == "connector" and loss.llm_weight > 0:
        raise SurdError("adapter.kind=connector has no distillation term: set loss.llm_weight: 0")
    if kind == REFERENCE and loss.llm_weight == 0 and loss.prompt_weight == 0:
        raise SurdError(f"adapter.kind={REFERENCE} detaches the diffusion loss: with loss.llm_weight and "
                        "loss.prompt_weight both 0 nothing would train it")


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


def _say(message: str | None) -> None:
    # Before accelerate starts, the rank comes from the launcher's environment; one line from the main process.
    if message and os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def _start(config: TrainConfig) -> tuple[Path, dict[str, Any], Plan]:
    check_config(config)
    data_dir = resolve_dataset(Path(config.data))
    run = identity(config, dataset_revision(data_dir))
    return data_dir, run, plan(config, run)  # refuses a folder holding another run before any data work


def training_plan(config: TrainConfig) -> Plan:
    """What `train(config)` would do with its folder (train, resume, skip; or a SurdError), without doing it."""
    return _start(config)[2]


def train(config: TrainConfig, on_step: Callable[[int, dict[str, float]], None] | None = None,
          progress: bool = True) -> Path:
    """Run (or resume) a training run; returns the run folder holding adapter.safetensors."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    data_dir, run, start = _start(config)
    out = Path(config.out)
    if start.action == "skip":
        _say(start.message)
        return out
    precision = config.mixed_precision
    if precision == "auto":
        chosen = resolve_precision("auto", resolve_device("auto"))
        precision = "no" if chosen == "fp32" else chosen  # accelerate calls fp32 "no"
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=config.gradient_accumulation,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    try:
        return _train(config, accelerator, out, data_dir, run, start, on_step, progress)
    finally:
        accelerator.end_training()
        # Free the shared accelerate state, so a later run in this process may pick other settings.
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _trackers(config: TrainConfig, accelerator: Any, out: Path, run: dict[str, Any]) -> None:
    if config.report_to == "tensorboard":
        accelerator.init_trackers("adapter", config=_flat(config))  # logs/adapter/: one run per folder
    elif config.report_to == "wandb":
        # One W&B run per training run: a resumed run continues it (its id comes from the folder and identity).
        key = f"{out.resolve()}/{identity_fingerprint(run, resumable=True)}"
        run_id = "surd-" + hashlib.sha256(key.encode()).hexdigest()[:12]
        accelerator.init_trackers("surd-adapter", config=_flat(config), init_kwargs={"wandb": {
            "dir": str(out / "logs"), "name": out.name, "id": run_id, "resume": "allow"}})


def _train(config: TrainConfig, accelerator: Any, out: Path, data_dir: Path, run: dict[str, Any], start: Plan,
           on_step: Callable | None, progress: bool) -> Path:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from adapter.base import base_fingerprint, load_pipeline
    from adapter.inference import compare

    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir(Path(config.data))
    weight_dtype = precision_dtype(accelerator.mixed_precision)
    device = accelerator.device
    main = accelerator.is_main_process
    kind, loss = config.adapter.kind, config.loss
    if start.message:
        accelerator.print(start.message)
    if main:
        if start.clear:
            clear(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "train_config.json", config.model_dump())
        write_identity(out, run)
    accelerator.wait_for_everyone()

    pipe = load_pipeline(config.base, dtype=weight_dtype, config=config.base_config)
    base_id = base_fingerprint(pipe)
    pipe = prepare_frozen(pipe, device, config.gradient_checkpointing)
    encoder = PromptEncoder.of(pipe)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    need_keyword = loss.prompt_weight > 0
    need_vectors, need_tokens = loss.llm_weight > 0, kind == "connector"
    flips = [False, True] if config.random_flip else [False]
    latents = latent_cache(cache_dir, pipe.vae, config.base, config.resolution) if config.cache_latents else None
    samples = read_samples(data_dir, config.split, config.max_samples,
                           keep_image=lambda s: latents is None or any(latent_key(s, f) not in latents for f in flips))

    teacher, llm_dim = None, None
    with accelerator.main_process_first():  # rank 0 builds the caches, the others then find them complete
        if need_vectors or need_tokens:
            items = [(s.id, s.narrative) for s in samples] + ([("", "")] if need_tokens else [])
            teacher, _ = build_teacher_cache(
                items, cache_dir, config.llm, config.layer, config.pooling, device=device,
                batch_size=config.teacher_batch_size, keep_tokens=config.keep_teacher_tokens or need_tokens,
                dtype=config.teacher_dtype)
            llm_dim = int(teacher.info["hidden_size"])
        texts = None
        if latents is not None:
            build_latent_cache(latents, pipe.vae, samples, config.resolution, flips, config.batch_size)
        if config.cache_text:
            texts = text_cache(cache_dir, encoder, config.base)
            items = [(s.id, s.narrative) for s in samples]
            items += [(s.id, s.keyword) for s in samples] if need_keyword else []
            build_text_cache(texts, encoder, None, items)
    if latents is not None:
        for s in samples:
            s.image = None  # the cache has them now; don't hold every image in memory
    empty = None
    if config.caption_dropout > 0:
        empty_llm = None
        if need_tokens:
            states = teacher.get(tokens_key("", "")).to(device).float()[None]
            empty_llm = LLMBatch(None, states, torch.ones(states.shape[:2], dtype=torch.long, device=device))
        empty = EmptyPrompt(encoder([""]), empty_llm)

    dataset = AdapterDataset(samples, seed=config.seed, resolution=config.resolution, center_crop=config.center_crop,
                             random_flip=config.random_flip, tokenizer=encoder, latents=latents, texts=texts,
                             teacher=teacher, need_keyword=need_keyword, teacher_vectors=need_vectors,
                             teacher_tokens=need_tokens)
    batches = EpochBatches(len(dataset), config.batch_size, config.seed, accelerator.process_index,
                           accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                         num_workers=config.dataloader_workers)

    adapter = build_adapter(config, encoder.dim, llm_dim, encoder.pooled_dim)
    trainable = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay, eps=config.adam_epsilon)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_steps * accelerator.num_processes)
    ema = EMA(adapter, config.ema_decay) if config.ema_decay else None
    adapter, optimizer, lr_scheduler = accelerator.prepare(adapter, optimizer, lr_scheduler)

    step = 0
    if start.checkpoint is not None:
        accelerator.load_state(str(start.checkpoint))
        if ema is not None:
            ema.load(start.checkpoint)
        step = checkpoint_step(start.checkpoint)
    micro = step * config.gradient_accumulation
    batches.start_at(micro)  # the exact next sample, not the start of the epoch

    csv_log = _CsvLog(out / "logs" / "losses.csv", step) if main else None
    _trackers(config, accelerator, out, run)
    prompts = config.validation_prompts or [s.narrative for s in read_samples(data_dir, "test", 2)] or \
        [s.narrative for s in samples[:2]]
    validation = None  # the adapter as inference sees it (the connector also needs its LLM), made on first use
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
            terms = compute_losses(batch, adapter, pipe, noise_scheduler, loss, generator, config.caption_dropout,
                                   empty)
            accelerator.backward(terms["loss"])
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        for key, value in terms.items():
            running[key] += accelerator.gather(value.detach().float()).mean().item() / config.gradient_accumulation
        micro += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        if ema is not None:
            ema.update(accelerator.unwrap_model(adapter))
        row = {"step": step, "lr": lr_scheduler.get_last_lr()[0], **{k: running[k] for k in LOSS_TERMS}}
        running = dict.fromkeys(LOSS_TERMS, 0.0)
        accelerator.log({f"loss/{k}": row[k] for k in LOSS_TERMS} | {"lr": row["lr"]}, step=step)
        if csv_log is not None:
            csv_log.write(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            _save_checkpoint(accelerator, out, step, config.checkpoints_keep, ema)
        if config.validation_every and (step % config.validation_every == 0 or step == config.max_steps) and main:
            validation = validation or _runtime(config, accelerator.unwrap_model(adapter), device)
            with progress_bar(f"validation @ {step}", 2 * len(prompts) * config.validation_steps,
                              enabled=progress and main, unit="steps") as denoising:
                image = compare(pipe, validation, prompts, seed=config.seed, steps=config.validation_steps,
                                guidance_scale=config.guidance_scale, on_step=lambda: denoising.advance(1))
            (out / "validation").mkdir(parents=True, exist_ok=True)
            image.save(out / "validation" / f"step-{step:07d}.png")
            adapter.train()
        if on_step is not None:
            on_step(step, row)
    bar.close()

    accelerator.wait_for_everyone()
    if main:
        result = accelerator.unwrap_model(adapter)
        if ema is not None:
            ema.copy_to(result)  # the averaged weights are the result
        extra = {
            "base_model": config.base,
            "base_config": config.base_config,
            "base_fingerprint": base_id,  # generate and eval warn when their base's differs
            "run_fingerprint": identity_fingerprint(run),  # a recipe skips training when it is unchanged
            "text_dim": encoder.dim,
            "pooled_dim": encoder.pooled_dim,
            "teacher": {"model": config.llm, "layer": config.layer, "pooling": config.pooling,
                        "hidden_size": llm_dim, "dtype": config.teacher_dtype} if llm_dim else None,
            "loss": loss.model_dump(),
            "caption_dropout": config.caption_dropout,
            "ema_decay": config.ema_decay,
            "steps": step,
            "seed": config.seed,
            "surd": dataset_revision(data_dir),
        }
        result.save(out, extra)
    return out


def _runtime(config: TrainConfig, module: Any, device: torch.device) -> Any:
    from adapter.inference import AdapterRuntime

    teacher = None
    if config.adapter.kind == "connector":
        from adapter.teacher import DTYPES, load_teacher

        teacher = load_teacher(config.llm, device=device, dtype=DTYPES[config.teacher_dtype])
    return AdapterRuntime(module, teacher, config.layer)


def _save_checkpoint(accelerator: Any, out: Path, step: int, keep: int, ema: EMA | None = None) -> None:
    folder = out / "checkpoints" / f"checkpoint-{step:07d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        if ema is not None:
            ema.save(folder)
        # train_state.json last: a folder without it is an interrupted save and is never resumed from.
        atomic_write_json(folder / "train_state.json", {"step": step})
        done = sorted((p for p in folder.parent.glob("checkpoint-*") if (p / "train_state.json").is_file()),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
