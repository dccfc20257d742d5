"""The base model an adapter sits on: loading it in any form people have it, and knowing it again later.

`--base` is a diffusers folder, a hub id, or one checkpoint file (`.safetensors`, or `.ckpt` read with
`weights_only=True`: tensors only, no pickled code runs), as most people have SD 1.5. A single file holds the
weights but not the configs and tokenizer: diffusers takes them from `--base-config` (a diffusers folder or hub id
of the same architecture) or, without it, from the hub id it infers from the checkpoint's keys.

`base_fingerprint` names the weights an adapter was trained between (text encoder(s) and UNet) by each tensor's
name, shape and the sign of its sampled values: the same for a folder and a single file of the same weights, in
any precision (rounding to fp16/bf16 keeps every sign), and different for a fine-tune (which moves weights across
zero). `surd generate` and `surd eval` compare it with the one the adapter recorded and warn in one line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapter.model import CONFIG_NAME
from surd.errors import SurdError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
SAMPLE = 4096  # values per tensor whose signs enter the fingerprint
FINGERPRINTED = ("text_encoder", "text_encoder_2", "unet")


def is_single_file(base: str) -> bool:
    """A checkpoint file rather than a diffusers folder or hub id."""
    return Path(base).suffix in SINGLE_FILE_SUFFIXES and not Path(base).is_dir()


def _checkpoint_keys(path: Path) -> list[str]:
    """The tensor names in a single-file checkpoint; a `.ckpt` holding more than tensors is refused."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise SurdError(f"--base {path}: not a readable .safetensors file: {e}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError for code or foreign objects, RuntimeError for a damaged archive
        raise SurdError(f"--base {path}: a .ckpt is read with weights_only=True (tensors only, no pickled code), "
                        f"and this one holds more than tensors or is damaged ({type(e).__name__}); convert it to "
                        ".safetensors with the tool that made it") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return list(state) if isinstance(state, dict) else []


def _pipeline_class(base: str, config: str | None, keys: list[str] | None = None) -> Any:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if keys is not None and config is None:
        sdxl = any(k.startswith("conditioner.embedders.1.") for k in keys)  # SDXL's second text encoder
    else:
        sdxl = "XL" in DiffusionPipeline.load_config(config or base).get("_class_name", "")
    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline


def load_pipeline(base: str, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                  config: str | None = None) -> Any:
    """Any Stable Diffusion 1.x/2.x or SDXL: folder, hub id or single file (`config`: where a single file's
    configs come from); safety checker and progress bars off."""
    from diffusers import StableDiffusionXLPipeline

    extra: dict[str, Any] = {}
    try:
        if is_single_file(base):
            path = Path(base)
            if not path.is_file():
                raise SurdError(f"--base {base}: no such file")
            cls = _pipeline_class(base, config, _checkpoint_keys(path))
            if cls is not StableDiffusionXLPipeline:
                extra = dict(safety_checker=None, requires_safety_checker=False)
            pipe = cls.from_single_file(str(path), config=config, dtype=dtype, **extra)
            pipe.register_to_config(_name_or_path=str(path))  # what warnings call it (unset by diffusers)
        else:
            cls = _pipeline_class(base, None)
            if cls is not StableDiffusionXLPipeline:
                extra = dict(safety_checker=None, requires_safety_checker=False)
            pipe = cls.from_pretrained(base, dtype=dtype, **extra)
    except (OSError, ValueError) as e:
        hint = ""
        if is_single_file(base):
            hint = (" (a single file needs its model's configs and tokenizer: --base-config DIR, a diffusers folder "
                    "of the same architecture, or a hub id reachable from here)")
        raise SurdError(f"--base {base!r}: cannot load a Stable Diffusion pipeline: {e}{hint}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def base_fingerprint(pipe: Any) -> str:
    """The text encoder(s) and UNet by tensor name, shape and the signs of up to SAMPLE values each."""
    digest = hashlib.sha256()
    for part in FINGERPRINTED:
        module = getattr(pipe, part, None)
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            if not tensor.is_floating_point():
                continue
            flat = tensor.detach().reshape(-1)
            signs = torch.signbit(flat[:: max(1, flat.numel() // SAMPLE)][:SAMPLE]).cpu().numpy()
            # transformers >= 5.6 names CLIP's tensors without the `text_model.` level: both spell one tensor
            digest.update(f"{part}.{name.removeprefix('text_model.')}{tuple(tensor.shape)}".encode())
            digest.update(np.packbits(signs).tobytes())
    return digest.hexdigest()[:16]


def base_mismatch(pipe: Any, adapter_dir: Path, base: str) -> str | None:
    """One line when `pipe` (loaded from `base`) is not the base the adapter in `adapter_dir` was trained on."""
    saved = json.loads((Path(adapter_dir) / CONFIG_NAME).read_text())
    recorded = saved.get("base_fingerprint")
    if not recorded:
        return None  # trained before fingerprints were recorded (or converted from an original checkpoint)
    here = base_fingerprint(pipe)
    if here == recorded:
        return None
    return (f"warning: --base {base} is not the model this adapter was trained on ({saved.get('base_model', '?')}): "
            f"their text encoder/UNet weights differ (fingerprint {here} vs {recorded}); images may not show what "
            "the adapter learned")
