"""The SUR-adapter: a small transformer between the frozen SD text encoder and the UNet.

    x [B, T, D]  (the text encoder's last hidden state; D from its config: 768 SD 1.x, 1024 SD 2.x)
      -> batch-first transformer encoder (depth, heads, ff_dim)        = e
      -> the paper's attention block back onto the input:
           a = softmax(Wq e · (Wk x)ᵀ / √D) · Wv x + x ;  h = MLP(a) + a
      -> zero-initialised output layer                                 = f(x)
      mix "residual" (default): x + η·f(x)          exactly the identity at init
      mix "paper":              η·f(x) + (1−η)·x    as published

The original encoder was built without `batch_first` and fed [B, T, D], so it attended across the batch.
Here every sample is encoded on its own. An optional trainable `llm_projection` maps the pooled output
into the teacher LLM's hidden size for distillation; it lives in this module so it is saved with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adapter.config import Mix
from surd.errors import SurdError

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"


class PaperAttention(nn.Module):
    """The paper's single-head attention from the encoded sequence back onto the adapter input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        # The original used the raw input as V; start there (identity) and let training move it.
        nn.init.eye_(self.value.weight)
        nn.init.zeros_(self.value.bias)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, encoded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # SDPA's default scale is 1/sqrt(last dim) = 1/sqrt(D), the paper's single-head scale.
        attended = F.scaled_dot_product_attention(self.query(encoded), self.key(x), self.value(x)) + x
        return self.mlp(attended) + attended


class AdapterOutput(NamedTuple):
    """A tuple, so DDP and autocast see its tensors."""

    output: torch.Tensor  # [B, T, D] what conditions the UNet
    encoded: torch.Tensor  # [B, T, D] the transformer encoder's output (the paper distils this)
    branch: torch.Tensor  # [B, T, D] f(x), before mixing
    projected: torch.Tensor | None  # [B, H] pooled output mapped into the teacher's hidden size (llm_dim set)


class SURAdapter(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int = 2,
        heads: int = 8,
        ff_dim: int = 2048,
        eta: float = 0.1,
        mix: Mix = "residual",
        dropout: float = 0.1,
        llm_dim: int | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise SurdError(f"adapter heads={heads} must divide the text encoder's hidden size {dim}")
        if mix not in ("residual", "paper"):
            raise SurdError(f"adapter mix={mix!r}: expected residual or paper")
        self.config: dict[str, Any] = dict(
            dim=dim, depth=depth, heads=heads, ff_dim=ff_dim, eta=eta, mix=mix, dropout=dropout, llm_dim=llm_dim
        )
        self.eta, self.mix = eta, mix
        layer = nn.TransformerEncoderLayer(dim, heads, ff_dim, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.attention = PaperAttention(dim)
        self.out = nn.Linear(dim, dim)
        # Zero weight AND bias: the original zeroed only the weight, so its random bias leaked in at init.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.llm_projection = nn.Linear(dim, llm_dim) if llm_dim else None

    @property
    def dim(self) -> int:
        return self.config["dim"]

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, return_parts: bool = False
    ) -> torch.Tensor | AdapterOutput:
        """[B, T, D] -> [B, T, D]. With `return_parts`: an AdapterOutput, whose `projected` pools the output
        over the tokens where `mask` [B, T] is 1 (all if None) and maps it through `llm_projection`."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"SURAdapter expects [batch, tokens, {self.dim}], got {list(x.shape)}")
        encoded = self.encoder(x)
        branch = self.out(self.attention(encoded, x))
        if self.mix == "residual":
            output = x + self.eta * branch
        else:
            output = self.eta * branch + (1.0 - self.eta) * x
        if not return_parts:
            return output
        # The projection runs inside forward so DDP sees its parameters used.
        projected = self.llm_projection(masked_mean(output, mask)) if self.llm_projection is not None else None
        return AdapterOutput(output, encoded, branch, projected)

    def save(self, out_dir: Path, extra: dict[str, Any] | None = None) -> None:
        """Write adapter.safetensors and adapter_config.json (model dims plus `extra` provenance)."""
        from safetensors.torch import save_file

        from surd.shards import atomic_write_json

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = out_dir / f".{WEIGHTS_NAME}.tmp"
        save_file(state, str(tmp))
        tmp.replace(out_dir / WEIGHTS_NAME)
        atomic_write_json(out_dir / CONFIG_NAME, {"adapter": self.config, **(extra or {})})

    @classmethod
    def load(cls, run_dir: Path, map_location: str | torch.device = "cpu") -> SURAdapter:
        """Load an adapter written by `save` (a training run folder or any folder holding the two files)."""
        from safetensors.torch import load_file

        run_dir = Path(run_dir)
        config_path, weights_path = run_dir / CONFIG_NAME, run_dir / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise SurdError(f"{run_dir}: no {CONFIG_NAME} + {WEIGHTS_NAME} (is it a finished `surd train` run?)")
        config = json.loads(config_path.read_text())["adapter"]
        model = cls(**config)
        model.load_state_dict(load_file(str(weights_path), device=str(map_location)))
        return model.eval()


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens [B, T, D] -> [B, D], counting only positions where `mask` [B, T] is 1."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
