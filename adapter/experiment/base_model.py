"""The world's Stable Diffusion: a small VAE, a small UNet with cross-attention, a frozen random CLIP text encoder
and a DDIM scheduler, trained here and saved as a diffusers `StableDiffusionPipeline` folder.

    VAE      AutoencoderKL, 16 px -> 8x8x4 latents; reconstruction + a small KL term; `scaling_factor` set
             from the latents' spread (what SD's 0.18215 is)
    text     CLIPTextModel, random and frozen (as SD's is frozen), its word embeddings at unit scale so every
             output token still says which word it is; the tokenizer is CLIP's BPE, first merges
    UNet     UNet2DConditionModel, cross-attention (2 heads) in every block and a pooled text embedding,
             trained on (image, caption) with the v objective; 10% of captions dropped to "" so classifier-free
             guidance works
    sched    DDIM, SD 1.5's betas rescaled to a zero terminal SNR, trailing timesteps

`train_unet` is the one trainer of the UNet: it trains the base on keyword prompts and, from the base
weights, the fine-tune control on narrative prompts (the same data the adapters see).
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

TOKENIZER_MERGES = 10_000  # whole words for the world's vocabulary; the table stays small
MAX_TOKENS = 48  # the longest cleaned keyword prompt is ~40 tokens
TEXT_DIM = 64
# Share of training timesteps drawn from the noisier half, where the layout and colour (this world's attributes)
# are decided: with uniform timesteps 150 steps left the base at chance even on keyword prompts.
HIGH_NOISE = 0.7


@dataclass
class Schedule:
    """Optimiser steps, batch and learning rate of one training."""

    steps: int
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0


def pixels(images: list[bytes] | list[Image.Image]) -> torch.Tensor:
    """Images as [N, 3, H, W] in [-1, 1] (the VAE's range)."""
    arrays = []
    for image in images:
        if isinstance(image, bytes):
            image = Image.open(io.BytesIO(image))
        arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def build_tokenizer() -> Any:
    from surd.demo.tiny import clip_tokenizer

    return clip_tokenizer(TOKENIZER_MERGES, max_length=MAX_TOKENS)


def build_text_encoder(tokenizer: Any, seed: int = 0) -> Any:
    """A random, frozen CLIP text encoder whose outputs keep the words' identity, as a trained CLIP's do.

    CLIP's initialisation draws word embeddings with std 0.02 while each random layer adds terms of order 1: two
    layers drown the words, and an attention probe read a keyword prompt's colour from the outputs only 65% of the
    time (the base model's colour ceiling stalled near 0.5). With unit-scale word embeddings (`nn.Embedding`'s
    default) the residual stream carries the word and the layers add context: the same probe reads 100%.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=TEXT_DIM,
    ))
    words = encoder.get_input_embeddings().weight
    with torch.no_grad():
        words.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    return encoder.eval().requires_grad_(False)


def build_vae(seed: int = 0) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), sample_size=16,
    )


def build_unet(seed: int = 0, latent_side: int = 8, pooled_text: bool = True) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    # pooled_text: an attention-pooled summary of the text tokens joins the timestep embedding (as SDXL's pooled
    # text embedding does), on top of the cross-attention; the UNet reads the same text tokens either way.
    extra = {"addition_embed_type": "text", "addition_embed_type_num_heads": 4} if pooled_text else {}
    return UNet2DConditionModel(
        sample_size=latent_side, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
        attention_head_dim=2, **extra,
    )


def build_scheduler() -> Any:
    from diffusers import DDIMScheduler

    # SD 1.5's betas rescaled to a zero terminal SNR (Lin et al. 2024), so the last step is pure noise: with SD's
    # schedule the noisiest training input still shows where the object is, and a small model learns to read
    # the layout from that leak instead of from the prompt. Zero terminal SNR needs v-prediction and trailing steps.
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
                         rescale_betas_zero_snr=True, timestep_spacing="trailing")


def _batches(n: int, schedule: Schedule) -> Any:
    """Index batches over `n` items, reshuffled every epoch, `schedule.steps` of them."""
    rng = np.random.default_rng(schedule.seed)
    order: list[int] = []
    for _ in range(schedule.steps):
        if len(order) < schedule.batch_size:
            order += rng.permutation(n).tolist()
        batch, order = order[: schedule.batch_size], order[schedule.batch_size :]
        yield torch.tensor(batch)


def train_vae(images: torch.Tensor, schedule: Schedule, kl_weight: float = 1e-4,
              log: Callable[[str], None] = print) -> Any:
    """Fit the VAE to `images` ([N, 3, H, W] in [-1, 1]); sets `scaling_factor` to 1 / std of the latents."""
    vae = build_vae(schedule.seed).train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=schedule.learning_rate, weight_decay=0.0)
    started = time.perf_counter()
    for step, index in enumerate(_batches(len(images), schedule), 1):
        batch = images[index]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / batch[0].numel()
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + kl_weight * kl
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % 100 == 0 or step == schedule.steps:
            log(f"vae step {step}/{schedule.steps}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


@torch.no_grad()
def encode_texts(tokenizer: Any, text_encoder: Any, texts: list[str]) -> torch.Tensor:
    """Last hidden states [N, T, D], padded as SD pipelines pad."""
    from adapter.data import text_embeds, tokenize

    out = []
    for start in range(0, len(texts), 256):
        ids, mask = tokenize(tokenizer, texts[start : start + 256])
        out.append(text_embeds(text_encoder, ids, mask))
    return torch.cat(out)


def train_unet(unet: Any, vae: Any, tokenizer: Any, text_encoder: Any, images: torch.Tensor, captions: list[str],
               schedule: Schedule, caption_dropout: float = 0.1, snr_gamma: float | None = None,
               high_noise: float = 0.0, log: Callable[[str], None] = print) -> Any:
    """Train `unet` on (image, caption) pairs with the scheduler's objective (v); frozen VAE and text encoder."""
    from diffusers import DDPMScheduler

    from adapter.losses import diffusion_loss, diffusion_target

    noise_scheduler = DDPMScheduler.from_config(build_scheduler().config)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        latents = latents * vae.config.scaling_factor
    unique = sorted(set(captions) | {""})
    embeds = encode_texts(tokenizer, text_encoder, unique)
    caption_index = torch.tensor([unique.index(c) for c in captions])
    empty = unique.index("")
    unet.train().requires_grad_(True)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=schedule.learning_rate, weight_decay=1e-2)
    # cosine decay to a tenth: a high rate learns the prompt's attributes in few steps, the decay settles the weights
    decay = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * min(step, schedule.steps) / schedule.steps)))
    generator = torch.Generator().manual_seed(schedule.seed)
    rng = random.Random(schedule.seed)
    started = time.perf_counter()
    for step, index in enumerate(_batches(len(latents), schedule), 1):
        x0 = latents[index]
        which = caption_index[index].clone()
        which[[i for i in range(len(which)) if rng.random() < caption_dropout]] = empty
        noise = torch.randn(x0.shape, generator=generator)
        t = _timesteps(len(x0), noise_scheduler.config.num_train_timesteps, high_noise, generator)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=embeds[which]).sample
        loss = diffusion_loss(pred, diffusion_target(noise_scheduler, x0, noise, t), t, noise_scheduler, snr_gamma)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        decay.step()
        if step % 100 == 0 or step == schedule.steps:
            log(f"unet step {step}/{schedule.steps}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
    return unet.eval().requires_grad_(False)


def _timesteps(n: int, total: int, high_noise: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform timesteps, a `high_noise` share of them drawn from the noisier half instead: that is where a
    picture's layout and colours are decided, what this world's attributes are."""
    t = torch.randint(0, total, (n,), generator=generator)
    noisy = torch.randint(total // 2, total, (n,), generator=generator)
    return torch.where(torch.rand(n, generator=generator) < high_noise, noisy, t)


def save_pipeline(folder: Path, vae: Any, tokenizer: Any, text_encoder: Any, unet: Any) -> Path:
    """A diffusers StableDiffusionPipeline folder (safetensors), loadable by `surd train/eval`."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)
