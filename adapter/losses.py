"""The SUR-adapter's losses: diffusion (through the frozen UNet), LLM distillation, keyword-prompt alignment.

    total = diffusion + λ_llm · distill(project(pool(adapter(narrative))), teacher)
                      + λ_prompt · align(adapter(narrative), text_encoder(keyword))

Corrected defaults vs the paper (docs/adapter.md has the full comparison):
- distillation `cosine` (default) or `mse` between the adapter's pooled output, mapped by a trainable,
  saved projection into the teacher's hidden size, and the fixed teacher vector. The paper's `kl` (a KL
  between softmaxes over the feature dimension) is offered as an option.
- alignment `cosine` between pooled (real-token mean) embeddings (default), or the paper's token-wise `kl`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from adapter.config import AlignKind, DistillKind
from adapter.model import masked_mean


def diffusion_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """ε or v, from the scheduler config's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio α²/σ² of each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler: Any,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """MSE of the UNet prediction, optionally min-SNR-γ weighted (arXiv 2303.09556)."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.dim())))
    if snr_gamma is None:
        return per_sample.mean()
    s = snr(scheduler, timesteps)
    weight = torch.clamp(s, max=snr_gamma)
    # ε-prediction divides by SNR; v-prediction by SNR + 1 (its target already carries the SNR factor).
    weight = weight / (s + 1.0) if scheduler.config.prediction_type == "v_prediction" else weight / s
    return (per_sample * weight).mean()


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) over the last dim, summed there, averaged elsewhere."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    p = F.softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_q, p, reduction="none").sum(dim=-1)
    return kl.mean() * temperature**2


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: DistillKind = "cosine",
                 temperature: float = 1.0) -> torch.Tensor:
    """Between the projected student [B, H] and the fixed teacher vector [B, H]."""
    teacher = teacher.float().detach()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student.float(), teacher, dim=-1)).mean()
    if kind == "mse":
        # LLM hidden states carry a few huge outlier features; compare on the layer-normalised target.
        return F.mse_loss(student.float(), F.layer_norm(teacher, teacher.shape[-1:]))
    return _kl(student, teacher, temperature)


def align_loss(adapted: torch.Tensor, adapted_mask: torch.Tensor | None, keyword: torch.Tensor,
               keyword_mask: torch.Tensor | None, kind: AlignKind = "cosine", temperature: float = 1.0) -> torch.Tensor:
    """Between the adapter's output for the narrative prompt and the keyword prompt's embedding [B, T, D]."""
    keyword = keyword.float().detach()
    if kind == "cosine":
        a, k = masked_mean(adapted.float(), adapted_mask), masked_mean(keyword, keyword_mask)
        return (1.0 - F.cosine_similarity(a, k, dim=-1)).mean()
    return _kl(adapted, keyword, temperature)
