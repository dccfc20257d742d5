"""An exponential moving average of the trained weights (`train.ema_decay`), checkpointed as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

EMA_NAME = "ema.safetensors"


class EMA:
    """shadow ← d·shadow + (1−d)·weights after every optimiser step, d = min(decay, (1+n)/(10+n)) (warm-up)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay, self.steps = decay, 0
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for name, param in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for name, param in module.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        state = {f"shadow.{n}": t.cpu().contiguous() for n, t in self.shadow.items()}
        state["steps"] = torch.tensor([self.steps])
        save_file(state, str(Path(folder) / EMA_NAME))

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(folder) / EMA_NAME))
        self.steps = int(state.pop("steps")[0])
        for name in self.shadow:
            self.shadow[name] = state[f"shadow.{name}"].to(self.shadow[name].device)
