"""The `connector` kind: the LLM's per-token states of the prompt condition the UNet, through a timestep-aware
resampler (in the spirit of ELLA, written from the idea).

    s [B, L, H]  the LLM's hidden states of the prompt's content tokens (BOS and padding masked out)
    c = LayerNorm(Linear(H -> W) s)                                        the states in the resampler's width W
    τ = MLP(sinusoid(t))                                                   the denoising step's embedding
    q⁰ = learnable queries [N, W]
    per block k (depth of them), every norm modulated by τ (adaptive LayerNorm: LN(h)·(1+γ) + β, gated by α):
        q ← q + α₁ · Attention(AdaLN₁(q), keys/values = [c ; AdaLN₁(q)])   the queries read the prompt (and each other)
        q ← q + α₂ · MLP(AdaLN₂(q))
    tokens = Linear(W -> D) LayerNorm(q)                                    [B, N, D], the UNet's cross-attention width
    conditioning "join":    [CLIP tokens ; tokens]   [B, 77 + N, D]   the UNet keeps what CLIP told it
    conditioning "replace": tokens                   [B, N, D]
    SDXL: the pooled text_embeds get a zero-initialised correction from the mean token (or pass through).

Because the tokens depend on t, the resampler runs at every denoising step; the LLM runs once per prompt.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adapter.model import PooledHead, read_saved, save_module
from surd.errors import SurdError


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of (possibly fractional) timesteps [B]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class _Block(nn.Module):
    """Cross-attention from the queries to [prompt states ; queries], then an MLP, both under adaptive norms."""

    def __init__(self, width: int, heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, width))
        # shift, scale, gate for each of the two sub-blocks, read from the step embedding.
        self.modulation = nn.Linear(width, 6 * width)
        self.dropout = dropout

    def forward(self, q: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor,
                step: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(step))[:, None].chunk(6, dim=-1)
        h = self.norm1(q) * (1 + scale1) + shift1
        kv = torch.cat([context, h], dim=1)
        keep = torch.cat([context_mask.bool(), torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)], dim=1)
        b, n, w = h.shape
        heads = self.heads
        query = self.query(h).view(b, n, heads, w // heads).transpose(1, 2)
        key, value = (t.view(b, -1, heads, w // heads).transpose(1, 2) for t in self.key_value(kv).chunk(2, dim=-1))
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=keep[:, None, None, :],
                                                  dropout_p=self.dropout if self.training else 0.0)
        q = q + (1 + gate1) * self.proj(attended.transpose(1, 2).reshape(b, n, w))
        h = self.norm2(q) * (1 + scale2) + shift2
        return q + (1 + gate2) * self.mlp(h)


class ConnectorOutput(NamedTuple):
    """A tuple, so DDP and autocast see its tensors."""

    output: torch.Tensor  # [B, 77 + N or N, D] what conditions the UNet
    tokens: torch.Tensor  # [B, N, D] the connector's own tokens
    pooled: torch.Tensor | None  # SDXL: [B, P] the pooled text_embeds for the UNet


class Connector(nn.Module):
    """LLM token states + timestep -> tokens for the UNet's cross-attention (see the module docstring)."""

    def __init__(self, dim: int, llm_dim: int, tokens: int = 64, width: int = 768, depth: int = 4, heads: int = 8,
                 ff_dim: int = 2048, dropout: float = 0.0, conditioning: str = "join", pooled_dim: int | None = None,
                 kind: str = "connector") -> None:
        super().__init__()
        if width % heads:
            raise SurdError(f"adapter heads={heads} must divide the connector width {width}")
        if conditioning not in ("join", "replace"):
            raise SurdError(f"adapter conditioning={conditioning!r}: expected join or replace")
        self.config: dict[str, Any] = dict(dim=dim, llm_dim=llm_dim, tokens=tokens, width=width, depth=depth,
                                           heads=heads, ff_dim=ff_dim, dropout=dropout, conditioning=conditioning,
                                           pooled_dim=pooled_dim, kind="connector")
        self.kind, self.conditioning = "connector", conditioning
        self.input = nn.Sequential(nn.Linear(llm_dim, width), nn.LayerNorm(width))
        self.time = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.queries = nn.Parameter(torch.randn(tokens, width) / math.sqrt(width))
        self.blocks = nn.ModuleList(_Block(width, heads, ff_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        self.pooled_head = PooledHead(dim, pooled_dim) if pooled_dim else None

    @property
    def dim(self) -> int:
        return self.config["dim"]

    def forward(self, states: torch.Tensor, mask: torch.Tensor, timesteps: torch.Tensor,
                text: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> ConnectorOutput:
        """states [B, L, H] with mask [B, L]; timesteps [B] (or one for all); text [B, 77, D] (join);
        pooled [B, P] (SDXL)."""
        b = states.shape[0]
        timesteps = torch.as_tensor(timesteps, device=states.device).reshape(-1).expand(b)
        step = self.time(timestep_embedding(timesteps, 256))
        context = self.input(states.float())
        q = self.queries[None].expand(b, -1, -1)
        for block in self.blocks:
            q = block(q, context, mask, step)
        tokens = self.out(self.norm(q))
        if self.conditioning == "join":
            if text is None:
                raise ValueError("a joining connector needs the CLIP tokens (text)")
            output = torch.cat([text.to(tokens.dtype), tokens], dim=1)
        else:
            output = tokens
        if pooled is not None and self.pooled_head is not None:
            pooled = self.pooled_head(pooled, tokens, None)
        return ConnectorOutput(output, tokens, pooled)

    def save(self, out_dir: Any, extra: dict[str, Any] | None = None) -> None:
        """Write adapter.safetensors and adapter_config.json."""
        save_module(self, out_dir, extra)

    @classmethod
    def load(cls, run_dir: Any, map_location: str | torch.device = "cpu") -> Connector:
        config, state = read_saved(run_dir, map_location)
        model = cls(**config)
        model.load_state_dict(state)
        return model.eval()
