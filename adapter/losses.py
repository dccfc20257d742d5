"""The losses every kind trains with: diffusion (through the frozen UNet), LLM distillation, keyword alignment.

    total = diffusion + λ_llm · distill(...) + λ_prompt · align(adapter(narrative), text_encoder(keyword))

Which tensors go into `distill` depends on the kind (adapter/kinds.py):
- `sur` (default): the adapter's pooled output, mapped by a trainable, saved projection into the teacher's
  hidden size, against the fixed teacher vector; `cosine` (default), `mse`, or `kl` over features.
- `paper` / `reference-with-defects`: the teacher vector resized into the text width, broadcast to every token
  of the adapter's transformer-encoder output, compared with the reference code's `paper` KL (`paper_kl`).
Alignment: `cosine` between pooled embeddings (default), token-wise `kl`, or the reference code's `paper` KL.
Pooling leaves out BOS and padding, on both sides the same way (`content_mask`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from adapter.config import AlignKind, DistillKind
from adapter.model import masked_mean


def diffusion_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """ε or v = √ᾱ·ε − √(1−ᾱ)·x₀, from the scheduler config's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ/(1−ᾱ) of each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights (arXiv 2303.09556): ε-prediction min(SNR, γ)/SNR, v-prediction min(SNR, γ)/(SNR+1)."""
    s = snr(scheduler, timesteps)
    # v-prediction divides by SNR + 1: its target already carries the SNR factor.
    denominator = s + 1.0 if scheduler.config.prediction_type == "v_prediction" else s
    return torch.clamp(s, max=gamma) / denominator


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler: Any,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """MSE of the UNet prediction, optionally min-SNR-γ weighted per sample."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.dim())))
    if snr_gamma is None:
        return per_sample.mean()
    return (per_sample * min_snr_weights(scheduler, timesteps, snr_gamma)).mean()


def offset_noise(noise: torch.Tensor, offset: torch.Tensor, scale: float) -> torch.Tensor:
    """Offset noise: one extra draw per (sample, channel) [B, C], the same at every pixel, times `scale`."""
    return noise + scale * offset.to(noise.dtype)[..., None, None]


def content_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The tokens that carry the prompt: the attention mask [B, T] without BOS (CLIP puts it first).

    BOS is the same for every prompt and has a large norm: counting it pulls every pooled vector toward one
    direction. An empty prompt (BOS + EOS) keeps its EOS, so no row is ever empty."""
    mask = attention_mask.clone()
    mask[:, 0] = 0
    return mask


def kl_over_features(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) over the last dim, summed there, averaged elsewhere; × T²."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    p = F.softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="none").sum(dim=-1).mean() * temperature**2


def paper_kl(x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The reference code's `distillation_loss(x, y)`: KL(softmax(y/T) ‖ softmax(x/T)), `x` broadcast to `y`,
    summed over tokens and features and averaged over the batch (`batchmean`); × T². Gradient flows into both."""
    log_q = F.log_softmax(x.float() / temperature, dim=-1)
    p = F.softmax(y.float() / temperature, dim=-1)
    log_q = log_q.expand_as(p)
    return F.kl_div(log_q, p, reduction="sum") / p.shape[0] * temperature**2


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: DistillKind = "cosine",
                 temperature: float = 1.0) -> torch.Tensor:
    """Between the student [..., H] and the teacher [..., H] (the teacher may broadcast over tokens)."""
    if kind == "cosine":
        teacher = teacher.float().expand_as(student)
        return (1.0 - F.cosine_similarity(student.float(), teacher, dim=-1)).mean()
    if kind == "mse":
        # LLM hidden states carry a few huge outlier features; compare on the layer-normalised target.
        target = F.layer_norm(teacher.float(), teacher.shape[-1:]).expand_as(student)
        return F.mse_loss(student.float(), target)
    if kind == "kl":
        return kl_over_features(student, teacher.float().expand_as(student), temperature)
    return paper_kl(teacher, student, temperature)  # argument order of the code: (resized LLM vector, encoder)


def align_loss(adapted: torch.Tensor, adapted_mask: torch.Tensor | None, keyword: torch.Tensor,
               keyword_mask: torch.Tensor | None, kind: AlignKind = "cosine", temperature: float = 1.0) -> torch.Tensor:
    """Between the adapter's output for the narrative prompt and the keyword prompt's embedding [B, T, D].

    The masks are the tokenizer's attention masks; `cosine` pools both sides over `content_mask` (no BOS, no
    padding). `kl` compares position t with position t (token mean); `paper` is the code's
    `distillation_loss(keyword, adapted)`."""
    keyword = keyword.float().detach()
    if kind == "cosine":
        a = masked_mean(adapted.float(), None if adapted_mask is None else content_mask(adapted_mask))
        k = masked_mean(keyword, None if keyword_mask is None else content_mask(keyword_mask))
        return (1.0 - F.cosine_similarity(a, k, dim=-1)).mean()
    if kind == "kl":
        return kl_over_features(adapted, keyword, temperature)
    return paper_kl(keyword, adapted, temperature)
