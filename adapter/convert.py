"""Import an original SUR-adapter checkpoint (`adapter_checkpoint*.pt` / `adapter.pt`) as the `paper` kind.

The original `Adapter` state dict holds:

    transformer_encoder.layers.{i}.*      nn.TransformerEncoderLayer(d_model, nhead=8, 2048), NOT batch_first
    encoder_layer.*                       the template layer TransformerEncoder deep-copied; never run: dropped
    attention.query_layer / key_layer     -> attention.query / attention.key
    attention.value_layer                 defined but never used (its forward takes V = the raw input):
                                             we load the identity, so V = x exactly as it ran
    attention.output_layer.0 / .2         -> attention.mlp.0 / attention.mlp.2
    fc                                    -> out

The encoder weights copy over unchanged: `batch_first` only changes which input axis is the sequence.
What changes is the behaviour, on purpose: the original fed [B, 77, D] to a sequence-first encoder, so
it attended across the batch (at batch 1, not at all across tokens); the converted adapter attends
over each prompt's 77 tokens. The LLM projection was never saved by the original, so none is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adapter.model import SURAdapter
from surd.errors import SurdError

_RENAMES = {
    "attention.query_layer.": "attention.query.",
    "attention.key_layer.": "attention.key.",
    "attention.output_layer.0.": "attention.mlp.0.",
    "attention.output_layer.2.": "attention.mlp.2.",
    "fc.": "out.",
}


def read_original(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, read with `weights_only=True` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise SurdError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for foreign or unsafe files
        raise SurdError(f"{path}: not a plain tensor checkpoint (read with weights_only=True): {e}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or "fc.weight" not in {k.removeprefix("module.") for k in state}:
        raise SurdError(f"{path}: not an original SUR-adapter state dict (no fc.weight)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def map_state(original: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rename the original keys to ours; return (state dict, inferred dims)."""
    dim = original["fc.weight"].shape[0]
    layers = {int(k.split(".")[2]) for k in original if k.startswith("transformer_encoder.layers.")}
    if not layers:
        raise SurdError("original checkpoint has no transformer_encoder.layers.*")
    ff_dim = original["transformer_encoder.layers.0.linear1.weight"].shape[0]
    state: dict[str, torch.Tensor] = {}
    for key, value in original.items():
        if key.startswith("encoder_layer.") or key.startswith("attention.value_layer."):
            continue
        if key.startswith("transformer_encoder."):
            state["encoder." + key.removeprefix("transformer_encoder.")] = value
            continue
        for old, new in _RENAMES.items():
            if key.startswith(old):
                state[new + key.removeprefix(old)] = value
                break
        else:
            raise SurdError(f"original checkpoint: unexpected key {key!r}")
    state["attention.value.weight"] = torch.eye(dim, dtype=original["fc.weight"].dtype)
    state["attention.value.bias"] = torch.zeros(dim, dtype=original["fc.weight"].dtype)
    return state, {"dim": dim, "depth": max(layers) + 1, "ff_dim": ff_dim}


def convert_original(ckpt: Path, out: Path, eta: float = 0.1, heads: int = 8, base_model: str | None = None) -> Path:
    """Write `out/adapter.safetensors` + `adapter_config.json` of the `paper` kind from an original checkpoint.

    `eta` is the original `--adapter_weight` (0.1 in its run.sh); `heads` its hard-coded nhead=8.
    """
    state, dims = map_state(read_original(ckpt))
    adapter = SURAdapter(dims["dim"], depth=dims["depth"], heads=heads, ff_dim=dims["ff_dim"], eta=eta, mix="paper",
                         kind="paper")
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SurdError(f"{ckpt}: cannot map onto SURAdapter (missing {missing}, unexpected {unexpected})")
    adapter.save(out, {"base_model": base_model, "text_dim": dims["dim"], "converted_from": str(ckpt),
                       "teacher": None})
    return Path(out)
