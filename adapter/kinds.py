"""The kinds behind `adapter.kind`: what each builds, how it conditions the frozen UNet, what it is trained on.

    kind                     module       conditions the UNet with                      auxiliary terms
    sur (default)            SURAdapter   x + η·f(x) of the CLIP tokens (identity at 0)  cosine(proj(pool(y)), LLM)
    paper                    SURAdapter   η·f(x) + (1−η)·x                              paper KL(resize(LLM), encoder)
    reference-with-defects   SURAdapter   as paper, DETACHED from the diffusion loss, attention across the batch,
                                          frozen random resize (a reproduction, for measurement)
    connector                Connector    resampler(LLM token states, t) [; CLIP tokens] optional alignment only

All kinds share the diffusion loss and the keyword alignment (adapter/losses.py); the loop is adapter/train.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapter.config import REFERENCE, REFERENCE_WARNING, AdapterSettings, LossSettings
from adapter.connector import Connector
from adapter.losses import align_loss, content_mask, distill_loss
from adapter.model import SURAdapter, read_saved
from adapter.text import TextBatch
from surd.errors import SurdError


class ReproductionWarning(UserWarning):
    """The `reference-with-defects` kind was selected: it reproduces known defects on purpose."""


@dataclass
class LLMBatch:
    """What the teacher LLM says about the (narrative) prompts."""

    vector: torch.Tensor | None = None  # [B, H] pooled (sur, paper, reference)
    states: torch.Tensor | None = None  # [B, L, H] per-token, content tokens only (connector)
    mask: torch.Tensor | None = None  # [B, L]

    def rows(self, index: torch.Tensor) -> LLMBatch:
        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return LLMBatch(take(self.vector), take(self.states), take(self.mask))


@dataclass
class Conditioning:
    """What goes into the UNet, plus what the auxiliary losses read."""

    hidden: torch.Tensor  # encoder_hidden_states
    pooled: torch.Tensor | None  # SDXL text_embeds
    parts: Any  # AdapterOutput or ConnectorOutput


def kind_of(adapter: nn.Module) -> str:
    return getattr(adapter, "module", adapter).kind  # DDP wraps the module


def warn_if_reference(kind: str) -> None:
    if kind == REFERENCE:
        warnings.warn(REFERENCE_WARNING, ReproductionWarning, stacklevel=3)


def build(settings: AdapterSettings, dim: int, llm_dim: int | None, pooled_dim: int | None = None) -> nn.Module:
    """A fresh adapter of `settings.kind` for a text width `dim` (and an LLM of width `llm_dim`)."""
    warn_if_reference(settings.kind)
    if settings.kind == "connector":
        if not llm_dim:
            raise SurdError("adapter.kind=connector needs a teacher LLM (--llm): its token states are the input")
        return Connector(dim, llm_dim, tokens=settings.tokens, width=settings.width, depth=settings.depth,
                         heads=settings.heads, ff_dim=settings.ff_dim, dropout=settings.dropout,
                         conditioning=settings.conditioning,
                         pooled_dim=pooled_dim if settings.pooled == "adapt" else None)
    return SURAdapter(dim, depth=settings.depth, heads=settings.heads, ff_dim=settings.ff_dim, eta=settings.eta,
                      mix=settings.mix, dropout=settings.dropout, llm_dim=llm_dim, kind=settings.kind,
                      pooled_dim=pooled_dim if settings.pooled == "adapt" else None)


def load(run_dir: Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """A saved adapter of any kind, in eval mode (adapter_config.json names the kind; none = `sur`)."""
    config, _ = read_saved(run_dir, "cpu")
    kind = config.get("kind", "sur")
    warn_if_reference(kind)
    cls = Connector if kind == "connector" else SURAdapter
    return cls.load(run_dir, map_location)


def condition(adapter: nn.Module, text: TextBatch, llm: LLMBatch | None, timesteps: torch.Tensor) -> Conditioning:
    """Run the adapter (through its wrapper, if any) on a batch: what conditions the UNet at `timesteps`."""
    kind = kind_of(adapter)
    if kind == "connector":
        if llm is None or llm.states is None:
            raise SurdError("the connector needs the teacher's per-token states (train.keep_teacher_tokens)")
        parts = adapter(llm.states, llm.mask, timesteps, text=text.hidden.float(),
                        pooled=None if text.pooled is None else text.pooled.float())
        return Conditioning(parts.output, parts.pooled if text.pooled is not None else None, parts)
    teacher = llm.vector if llm is not None and kind != "sur" else None
    parts = adapter(text.hidden.float(), mask=content_mask(text.mask), return_parts=True,
                    pooled=None if text.pooled is None else text.pooled.float(), teacher=teacher)
    hidden, pooled = parts.output, parts.pooled
    if kind == REFERENCE:
        # The original re-wrapped the output with torch.tensor(), which detaches it: reproduced on purpose.
        hidden = hidden.detach()
        pooled = None if pooled is None else pooled.detach()
    return Conditioning(hidden, pooled, parts)


def aux_losses(adapter: nn.Module, cond: Conditioning, text: TextBatch, keyword: TextBatch | None,
               llm: LLMBatch | None, keep: torch.Tensor | None, loss: LossSettings) -> dict[str, torch.Tensor]:
    """The distillation (`llm`) and alignment (`prompt`) terms, on the samples `keep` [B] (not caption-dropped)."""
    kind = kind_of(adapter)
    parts = cond.parts
    index = torch.arange(text.hidden.shape[0], device=text.hidden.device) if keep is None else keep.nonzero()[:, 0]
    terms: dict[str, torch.Tensor] = {}
    if len(index) == 0:  # every sample of this micro-batch trained on the empty prompt
        # A zero that still touches every output (projections included): DDP sees every parameter used, and
        # the graph survives where the UNet input is detached (reference).
        zero = sum(t.sum() for t in parts if isinstance(t, torch.Tensor)) * 0.0
        return {name: zero for name, weight in (("llm", loss.llm_weight), ("prompt", loss.prompt_weight)) if weight}
    if loss.llm_weight > 0:
        if kind == "connector":
            raise SurdError("adapter.kind=connector has no distillation term: set loss.llm_weight: 0")
        if kind == "sur":
            terms["llm"] = distill_loss(parts.projected[index], llm.vector[index].to(parts.projected.device),
                                        loss.llm_loss, loss.temperature)
        else:  # the paper's target: the resized LLM vector broadcast to every token of the encoder output
            terms["llm"] = distill_loss(parts.encoded[index], parts.projected[index][:, None, :], loss.llm_loss,
                                        loss.temperature)
    if loss.prompt_weight > 0 and keyword is not None:
        kw = keyword.rows(index)
        if kind == "connector":
            if loss.prompt_loss != "cosine":
                raise SurdError("adapter.kind=connector aligns pooled tokens: loss.prompt_loss must be cosine")
            terms["prompt"] = align_loss(parts.tokens[index], None, kw.hidden, kw.mask, "cosine")
        else:
            terms["prompt"] = align_loss(parts.output[index], text.mask[index], kw.hidden, kw.mask,
                                         loss.prompt_loss, loss.temperature)
    return terms


def parameter_counts(adapter: nn.Module) -> dict[str, int]:
    """Trainable and total parameters."""
    params = list(adapter.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}
