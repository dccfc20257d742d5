"""The SUR-adapter: a small transformer between the frozen SD text encoder and the UNet.

    x [B, T, D]  (the text encoder's last hidden state; D from its config: 768 SD 1.x, 1024 SD 2.x)
      -> batch-first transformer encoder (depth, heads, ff_dim)        = e
      -> the paper's attention block back onto the input:
           a = softmax(Wq e · (Wk x)ᵀ / √D) · Wv x + x ;  h = MLP(a) + a
      -> zero-initialised output layer                                 = f(x)
      mix "residual" (default): x + η·f(x)          exactly the identity at init
      mix "paper":              η·f(x) + (1−η)·x    as published

The original encoder was built without `batch_first` and fed [B, T, D], so it attended across the batch.
Here every sample is encoded on its own. The projection used for distillation lives in this module, so it
is trained and saved with it; its direction depends on the kind:
  sur      `llm_projection`      Linear(D -> H): the pooled output into the teacher's space (fixed target)
  paper    `teacher_projection`  Linear(H -> D): the teacher vector into the text width (the paper's "resize")
  reference-with-defects         the paper's layout with the original's defects kept ON PURPOSE, to measure
                                 them: encoder not batch-first (attends across the batch), `teacher_projection`
                                 frozen at random init, V = x frozen, output bias left random (not the identity);
                                 the diffusion loss is detached by the training math (adapter/kinds.py)
On SDXL (`pooled_dim` set) a `pooled_head` adds a zero-initialised correction to the pooled `text_embeds`,
read from the pooled adapted tokens: identity at init like the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adapter.config import REFERENCE, Mix
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
    projected: torch.Tensor | None  # sur: [B, H] pooled output in the teacher's space; paper: [B, D] resized teacher
    pooled: torch.Tensor | None = None  # SDXL: [B, P] the pooled text_embeds for the UNet


class PooledHead(nn.Module):
    """SDXL's pooled text_embeds plus a zero-initialised correction from the pooled conditioning tokens."""

    def __init__(self, dim: int, pooled_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + pooled_dim, pooled_dim), nn.SiLU(), nn.Linear(pooled_dim, pooled_dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        summary = masked_mean(tokens.float(), mask)
        return pooled + self.net(torch.cat([summary, pooled.float()], dim=-1)).to(pooled.dtype)


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
        kind: str = "sur",
        pooled_dim: int | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise SurdError(f"adapter heads={heads} must divide the text encoder's hidden size {dim}")
        if mix not in ("residual", "paper"):
            raise SurdError(f"adapter mix={mix!r}: expected residual or paper")
        if kind not in ("sur", "paper", REFERENCE):
            raise SurdError(f"SURAdapter kind={kind!r}: expected sur, paper or {REFERENCE}")
        self.config: dict[str, Any] = dict(
            dim=dim, depth=depth, heads=heads, ff_dim=ff_dim, eta=eta, mix=mix, dropout=dropout, llm_dim=llm_dim,
            kind=kind, pooled_dim=pooled_dim,
        )
        self.eta, self.mix, self.kind = eta, mix, kind
        reference = kind == REFERENCE
        # reference: sequence-first layer fed [B, T, D], so "the sequence" is the batch (the original's defect).
        layer = nn.TransformerEncoderLayer(dim, heads, ff_dim, dropout=dropout, batch_first=not reference)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.attention = PaperAttention(dim)
        self.out = nn.Linear(dim, dim)
        # Zero weight AND bias: the original zeroed only the weight, so its random bias leaked in at init.
        nn.init.zeros_(self.out.weight)
        if not reference:
            nn.init.zeros_(self.out.bias)
        self.llm_projection = nn.Linear(dim, llm_dim) if llm_dim and kind == "sur" else None
        self.teacher_projection = nn.Linear(llm_dim, dim) if llm_dim and kind != "sur" else None
        if reference:
            self.attention.value.requires_grad_(False)  # the original's forward used V = x, never value_layer
            if self.teacher_projection is not None:
                self.teacher_projection.requires_grad_(False)  # frozen at random init, as in the original
        self.pooled_head = PooledHead(dim, pooled_dim) if pooled_dim else None

    @property
    def dim(self) -> int:
        return self.config["dim"]

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, return_parts: bool = False,
        pooled: torch.Tensor | None = None, teacher: torch.Tensor | None = None,
    ) -> torch.Tensor | AdapterOutput:
        """[B, T, D] -> [B, T, D]. With `return_parts`: an AdapterOutput. Its `projected` is, for `sur`, the
        output pooled over the tokens where `mask` [B, T] is 1 (all if None) through `llm_projection`; for the
        paper's layout, the `teacher` vector [B, H] through `teacher_projection`. `pooled` [B, P]: SDXL's
        text_embeds, adapted by `pooled_head` (returned in `pooled`)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"SURAdapter expects [batch, tokens, {self.dim}], got {list(x.shape)}")
        encoded = self.encoder(x)
        branch = self.out(self.attention(encoded, x))
        if self.mix == "residual":
            output = x + self.eta * branch
        else:
            output = self.eta * branch + (1.0 - self.eta) * x
        if pooled is not None and self.pooled_head is not None:
            pooled = self.pooled_head(pooled, output, mask)
        if not return_parts:
            return output
        # The projections run inside forward so DDP sees their parameters used.
        projected = None
        if self.llm_projection is not None:
            projected = self.llm_projection(masked_mean(output, mask))
        elif self.teacher_projection is not None and teacher is not None:
            projected = self.teacher_projection(teacher.to(self.teacher_projection.weight.dtype))
        return AdapterOutput(output, encoded, branch, projected, pooled)

    def save(self, out_dir: Path, extra: dict[str, Any] | None = None) -> None:
        """Write adapter.safetensors and adapter_config.json (model dims plus `extra` provenance)."""
        save_module(self, out_dir, extra)

    @classmethod
    def load(cls, run_dir: Path, map_location: str | torch.device = "cpu") -> SURAdapter:
        """Load an adapter written by `save` (a training run folder or any folder holding the two files)."""
        config, state = read_saved(run_dir, map_location)
        config.setdefault("kind", "sur")  # written before kinds existed
        model = cls(**config)
        model.load_state_dict(state)
        return model.eval()


def save_module(module: nn.Module, out_dir: Path, extra: dict[str, Any] | None = None) -> None:
    """adapter.safetensors (fp32) + adapter_config.json {"adapter": module.config, **extra}, each written atomically."""
    from safetensors.torch import save_file

    from surd.shards import atomic_write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = out_dir / f".{WEIGHTS_NAME}.tmp"
    save_file(state, str(tmp))
    tmp.replace(out_dir / WEIGHTS_NAME)
    atomic_write_json(out_dir / CONFIG_NAME, {"adapter": module.config, **(extra or {})})


def read_saved(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """(the `adapter` section of adapter_config.json, the tensors of adapter.safetensors) of a saved adapter."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    config_path, weights_path = run_dir / CONFIG_NAME, run_dir / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise SurdError(f"{run_dir}: no {CONFIG_NAME} + {WEIGHTS_NAME} (is it a finished `surd train` run?)")
    try:
        config = dict(json.loads(config_path.read_text())["adapter"])
    except (ValueError, KeyError, TypeError) as e:
        raise SurdError(f"{config_path}: not an adapter config ({e})") from None
    return config, load_file(str(weights_path), device=str(map_location))


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens [B, T, D] -> [B, D], counting only positions where `mask` [B, T] is 1."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
