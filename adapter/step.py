"""One training micro-batch, the same for every kind: noise the latents, condition the frozen UNet through the
adapter, and compute every loss term.

    latents ~ VAE posterior (cached or recomputed)      noise ε (+ offset noise)      t ~ U{0..T-1}
    drop ~ Bernoulli(caption_dropout) per sample: the narrative becomes the empty prompt (CFG's unconditional)
    conditioning = kind(adapter, narrative, LLM, t)                                  adapter/kinds.py
    diffusion = ‖UNet(noisy, t, conditioning) − (ε or v)‖²  (min-SNR-γ optional)    adapter/losses.py
    total = diffusion + λ_llm·llm + λ_prompt·prompt   (auxiliary terms over the samples not dropped)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adapter.config import LossSettings
from adapter.data import latent_params, pad_states, sample_latents
from adapter.kinds import LLMBatch, aux_losses, condition
from adapter.losses import diffusion_loss, diffusion_target, offset_noise
from adapter.text import PromptEncoder, TextBatch


@dataclass
class EmptyPrompt:
    """The empty prompt, encoded once: what a caption-dropped sample trains on."""

    text: TextBatch  # [1, T, D]
    llm: LLMBatch | None = None  # [1, L, H] states (the connector)


def prepare_frozen(pipe: Any, device: torch.device, checkpointing: bool) -> Any:
    """Freeze the pipeline's models (loaded in the weight dtype); SDPA attention; UNet gradient checkpointing."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False).eval()
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    return pipe


def batch_text(batch: dict[str, Any], prefix: str, encoder: PromptEncoder) -> TextBatch:
    """The `narrative` / `keyword` prompts of a batch: cached embeddings, or encoded now from token ids."""
    device = encoder.device
    mask = batch[f"{prefix}_mask"].to(device)
    if f"{prefix}_embeds" in batch:
        pooled = batch.get(f"{prefix}_pooled")
        return TextBatch(batch[f"{prefix}_embeds"].to(device), mask, None if pooled is None else pooled.to(device))
    tokens = {name: batch[f"{prefix}_{name}"] for name in ("ids", "mask", "ids_2") if f"{prefix}_{name}" in batch}
    return encoder.encode(tokens)


def batch_llm(batch: dict[str, Any], device: torch.device) -> LLMBatch | None:
    vector, states = batch.get("teacher"), batch.get("teacher_tokens")
    if vector is None and states is None:
        return None
    return LLMBatch(None if vector is None else vector.to(device).float(),
                    None if states is None else states.to(device).float(),
                    None if states is None else batch["teacher_tokens_mask"].to(device))


def _drop_llm(llm: LLMBatch, drop: torch.Tensor, empty: LLMBatch) -> LLMBatch:
    """Token states of the dropped rows replaced by the empty prompt's (re-padded to a common length)."""
    rows = [empty.states[0][: int(empty.mask[0].sum())] if d else s[: int(m.sum())]
            for s, m, d in zip(llm.states, llm.mask, drop.tolist(), strict=True)]
    states, mask = pad_states(rows)
    return LLMBatch(llm.vector, states.to(llm.states.device), mask.to(llm.states.device))


def compute_losses(batch: dict[str, Any], adapter: torch.nn.Module, frozen: Any, noise_scheduler: Any,
                   loss: LossSettings, generator: torch.Generator, caption_dropout: float = 0.0,
                   empty: EmptyPrompt | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch: every loss term, with the adapter's output flowing through the frozen UNet."""
    device, dtype = frozen.device, frozen.unet.dtype
    encoder = PromptEncoder.of(frozen)
    if "latent_params" in batch:
        params = batch["latent_params"].to(device)
    else:  # recompute the VAE every step, as the original does (same math as the cached path)
        with torch.no_grad():
            params = latent_params(frozen.vae, batch["pixel_values"])
    latents = sample_latents(params, frozen.vae.config, generator)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    if loss.noise_offset:
        offset = torch.randn(latents.shape[:2], generator=generator, device=device)
        noise = offset_noise(noise, offset, loss.noise_offset)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)

    text, llm = batch_text(batch, "narrative", encoder), batch_llm(batch, device)
    keep = None
    if caption_dropout > 0:
        if empty is None:
            raise ValueError("caption dropout needs the encoded empty prompt")
        drop = torch.rand(latents.shape[0], generator=generator, device=device) < caption_dropout
        keep = ~drop
        if drop.any():
            text = text.where(drop, empty.text)
            if llm is not None and llm.states is not None and empty.llm is not None:
                llm = _drop_llm(llm, drop, empty.llm)
    cond = condition(adapter, text, llm, timesteps)
    added = None
    if encoder.sdxl:
        added = {"text_embeds": (cond.pooled if cond.pooled is not None else text.pooled).to(dtype),
                 "time_ids": batch["time_ids"].to(device, dtype)}
    # A dtype cast keeps the graph (the original re-wrapped with torch.tensor(), which detached it).
    pred = frozen.unet(noisy.to(dtype), timesteps, encoder_hidden_states=cond.hidden.to(dtype),
                       added_cond_kwargs=added).sample
    terms = {"diffusion": diffusion_loss(pred, target, timesteps, noise_scheduler, loss.snr_gamma)}
    keyword = batch_text(batch, "keyword", encoder) if loss.prompt_weight > 0 else None
    terms.update(aux_losses(adapter, cond, text, keyword, llm, keep, loss))
    total = terms["diffusion"]
    for name, weight in (("llm", loss.llm_weight), ("prompt", loss.prompt_weight)):
        if name in terms:
            total = total + weight * terms[name]
    terms["loss"] = total
    return terms
