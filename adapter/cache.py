"""Content-keyed tensor caches in safetensors shards (VAE latents, text embeddings, teacher vectors).

A cache is a folder: `info.json` (what produced the tensors: model fingerprint, settings) plus
`part-NNNNN.safetensors` shards. Every tensor's key is a hash of the sample `id` AND a hash of the
content it was computed from (image bytes, prompt text) plus the variant (e.g. flipped), never a step
or position, so an edited prompt or a re-exported dataset can never be paired with a stale tensor.
Shards are append-only and written atomically; tensors are read lazily (memory-mapped).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from surd.errors import SurdError
from surd.shards import atomic_write_json


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_key(sample_id: str, content_hash: str, *variant: str) -> str:
    """The key of one cached tensor: sample id + content hash + variant, hashed to a fixed-length name."""
    return hashlib.sha256("\0".join((sample_id, content_hash, *variant)).encode("utf-8")).hexdigest()[:40]


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able description (model name, config, settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(name_or_path: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """Describe a model for cache naming: its name, config, and (for local folders) weight file sizes/mtimes."""
    files: dict[str, list[float]] = {}
    path = Path(name_or_path)
    if path.is_dir():
        for f in sorted(path.rglob("*.safetensors")) + sorted(path.rglob("*.bin")) + sorted(path.rglob("*.gguf")):
            st = f.stat()
            files[str(f.relative_to(path))] = [st.st_size, st.st_mtime]
    elif path.is_file():
        st = path.stat()
        files[path.name] = [st.st_size, st.st_mtime]
    clean = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return {"model": str(name_or_path), "config": fingerprint(clean), "files": fingerprint(files)}


class TensorCache:
    """Append-only key -> tensor store in a folder of safetensors shards."""

    def __init__(self, folder: Path, info: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        info_path = self.folder / "info.json"
        if info_path.exists():
            stored = json.loads(info_path.read_text())
            if stored != json.loads(json.dumps(info, sort_keys=True, default=str)):
                raise SurdError(f"cache {self.folder} was built with different settings: {stored} (now {info})")
        else:
            atomic_write_json(info_path, json.loads(json.dumps(info, default=str)))
        self.info = info
        self._index: dict[str, Path] | None = None
        self._handles: dict[Path, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Open safetensors handles do not pickle (DataLoader workers): reopen lazily in the worker.
        return {**self.__dict__, "_handles": {}}

    def shards(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("part-*.safetensors") if not p.name.startswith("."))

    def index(self) -> dict[str, Path]:
        if self._index is None:
            from safetensors import safe_open

            self._index = {}
            for shard in self.shards():
                with safe_open(str(shard), framework="pt") as f:
                    for key in f.keys():
                        self._index[key] = shard
        return self._index

    def __contains__(self, key: str) -> bool:
        return key in self.index()

    def __len__(self) -> int:
        return len(self.index())

    def missing(self, keys: Iterable[str]) -> list[str]:
        index = self.index()
        return [k for k in dict.fromkeys(keys) if k not in index]

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write `tensors` as one new shard (temp file + rename)."""
        from safetensors.torch import save_file

        if not tensors:
            return
        numbers = [int(p.stem.split("-")[1]) for p in self.shards()]
        path = self.folder / f"part-{(max(numbers) + 1) if numbers else 0:05d}.safetensors"
        tmp = self.folder / f".{path.name}.{os.getpid()}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
        index = self.index()
        for key in tensors:
            index[key] = path

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        try:
            shard = self.index()[key]
        except KeyError:
            raise SurdError(f"cache {self.folder}: no entry {key} (cache incomplete; rebuild it)") from None
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(shard), framework="pt")
        return handle.get_tensor(key)
