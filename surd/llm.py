"""LLM backends for the pair stage, versioned prompt templates, and the request cache.

Backends take chat conversations (lists of `{"role", "content"}` messages) and return `n` sampled
completions per conversation:

- `TransformersLLM`: any causal LM by hub id, folder or GGUF file (`surd.models.resolve_llm`), the
  tokenizer's chat template, batched `generate` with left padding, and the keys/values of the prompt head
  shared by every row (system prompt + few-shot turns) computed once and reused (`prefix_cache`);
- `OpenAILLM` (`surd/llm_openai.py`): any OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, llama.cpp
  server, Ollama, TGI) with a concurrency limit, timeouts and retries; the API key comes from an environment variable.

Both are picklable before `setup()` (models and HTTP clients are created there, in the worker).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from surd.errors import StageError, SurdError
from surd.models import resolve_device, resolve_llm

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 48
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed}


class LLMError(Exception):
    """One request failed for good (after retries); the row is dropped with reason `llm_error`."""


# ---------------------------------------------------------------- templates


@dataclass(frozen=True)
class PromptTemplate:
    """A versioned chat prompt with few-shot examples; `id` (e.g. `rewrite-v1`) goes into `narrative_origin`."""

    name: str
    version: int
    inputs: tuple[str, ...]
    system: str
    user: str
    examples: tuple[dict[str, str], ...]
    digest: str  # of the file's text: part of every cache key, so an edited template never reuses old outputs

    @property
    def id(self) -> str:
        return f"{self.name}-v{self.version}"

    def messages(self, fields: dict[str, str]) -> Conversation:
        """System prompt, each example as a user/assistant turn, then the row's own user turn."""
        out = [{"role": "system", "content": self.system.strip()}]
        for example in self.examples:
            out.append({"role": "user", "content": self.user.format(**example)})
            out.append({"role": "assistant", "content": example["narrative"].strip()})
        out.append({"role": "user", "content": self.user.format(**{k: fields[k] for k in self.inputs})})
        return out


def load_template(spec: str) -> PromptTemplate:
    """A bundled template by id (`rewrite-v1`) or a path to a YAML file of the same layout."""
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text, where = path.read_text(), str(path)
    else:
        bundled = resources.files("surd") / "templates" / f"{spec}.yaml"
        if not bundled.is_file():
            known = sorted(p.name.removesuffix(".yaml") for p in (resources.files("surd") / "templates").iterdir()
                           if p.name.endswith(".yaml"))
            raise SurdError(f"template {spec!r}: not a YAML file and not a bundled template ({', '.join(known)})")
        text, where = bundled.read_text(), f"bundled template {spec}"
    try:
        raw = yaml.safe_load(text)
        inputs = tuple(raw["inputs"])
        template = PromptTemplate(
            name=str(raw["name"]), version=int(raw["version"]), inputs=inputs, system=str(raw["system"]),
            user=str(raw["user"]), examples=tuple(dict(e) for e in raw.get("examples") or ()),
            digest=hashlib.sha256(text.encode()).hexdigest()[:16],
        )
        for example in template.examples:
            template.user.format(**example)
            example["narrative"]  # noqa: B018 - every example needs its answer
        template.user.format(**{k: "" for k in inputs})
    except (yaml.YAMLError, KeyError, TypeError, ValueError, IndexError) as e:
        raise SurdError(f"{where}: not a valid prompt template ({type(e).__name__}: {e})") from None
    return template


# ---------------------------------------------------------------- request cache


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class RequestCache:
    """SQLite map: hash(model, template, input, sampling, attempt) -> the generated texts.

    Safe to share between worker processes (WAL mode, busy timeout); the connection opens lazily in
    each process, so the cache pickles as just its path.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_conn": None}

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=60)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS generations (key TEXT PRIMARY KEY, texts TEXT NOT NULL)")
        return self._conn

    def get_many(self, keys: list[str]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        db = self._db()
        for start in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, texts in db.execute(f"SELECT key, texts FROM generations WHERE key IN ({marks})", chunk):
                found[key] = json.loads(texts)
        return found

    def put_many(self, items: dict[str, list[str]]) -> None:
        if items:
            with self._db() as db:
                db.executemany("INSERT OR REPLACE INTO generations VALUES (?, ?)",
                               [(k, json.dumps(v, ensure_ascii=False)) for k, v in items.items()])


# ---------------------------------------------------------------- backends


def model_label(spec: str) -> str:
    """A short, path-free model name for `narrative_origin`."""
    if spec.startswith("package:") or not Path(spec).expanduser().exists():
        return spec
    return Path(spec).name


class TransformersLLM:
    """A local causal LM through transformers; fp16 on GPU, fp32 on CPU.

    `prefix_cache=False` turns off the shared-prefix KV cache (outputs are the same either way).
    """

    MIN_PREFIX = 8  # shorter shared prefixes are not worth a cache
    MAX_PREFIXES = 4  # cached prefixes per backend (one per template in practice)

    def __init__(self, model: str, device: str = "auto", batch_size: int = 16, prefix_cache: bool = True) -> None:
        self.spec = model
        self.label = model_label(model)
        self.device = device
        self.batch_size = batch_size
        self.prefix_cache = prefix_cache
        self.calls = 0  # generate() calls, for stats and tests
        self.prefix_builds = 0  # prefix KV caches computed, for stats and tests
        self._model: Any = None
        self._tokenizer: Any = None
        self._prefixes: dict[tuple[int, ...], list[tuple[Any, Any]]] = {}  # prefix ids -> per-layer (keys, values)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None, "_tokenizer": None, "_prefixes": {}}

    def setup(self) -> None:
        if self._model is not None:
            return
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()  # the executor draws the stage's own progress bar
        location = resolve_llm(self.spec)
        self.device = resolve_device(self.device)
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(location.path, gguf_file=location.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(location.path, gguf_file=location.gguf_file, dtype=dtype)
        except OSError as e:
            raise StageError(f"LLM {self.spec!r}: cannot load ({e})") from None
        tokenizer.padding_side = "left"  # decoder-only batching: pad on the left so every row ends at its prompt
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._tokenizer, self._model = tokenizer, model.to(self.device).eval()

    def _render(self, conversation: Conversation) -> str:
        tok = self._tokenizer
        if tok.chat_template:
            return tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        # a base model without a chat template: a plain transcript it can continue
        return "".join(f"{m['role']}: {m['content']}\n" for m in conversation) + "assistant:"

    def generate(self, conversations: list[Conversation], n: int, sampling: Sampling) -> list[list[str] | LLMError]:
        import torch

        self.setup()
        tok, model = self._tokenizer, self._model
        texts = [self._render(c) for c in conversations]
        out: list[list[str] | LLMError] = []
        sample = sampling.temperature > 0
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            devices = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                inputs = self._prefixed_inputs(conversations[start : start + len(chunk)], chunk, n,
                                               sampling.max_new_tokens)
                if inputs is None:
                    enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                    inputs = dict(enc.to(self.device))
                prompt_length = inputs["input_ids"].shape[1]
                torch.manual_seed(sampling.seed)  # reproducible sampling without touching the caller's RNG
                extra = {"temperature": sampling.temperature, "top_p": sampling.top_p} if sample else {}
                generated = model.generate(
                    **inputs, do_sample=sample, num_return_sequences=n, max_new_tokens=sampling.max_new_tokens,
                    pad_token_id=tok.pad_token_id, **extra,
                )
            self.calls += 1
            decoded = tok.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)
            out.extend(decoded[i * n : (i + 1) * n] for i in range(len(chunk)))
        return out

    # Shared-prefix KV cache: the system prompt and few-shot turns are the same for every row, so their keys and
    # values are computed once and reused. A batch is laid out as [prefix][padding][row suffix] with the padding
    # masked out; positions follow the mask (generate derives them from its cumsum), so every row sees exactly the
    # tokens and positions of its unpadded prompt, as with plain left padding.

    def _prefixed_inputs(self, conversations: list[Conversation], texts: list[str], n: int,
                         max_new_tokens: int) -> dict[str, Any] | None:
        """`generate` kwargs that reuse a cached prefix, or None to fall back to plain left padding."""
        import torch

        from surd.llm_cache import preallocated_cache

        if not self.prefix_cache:
            return None
        tok = self._tokenizer
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        head = self._shared_prefix(conversations[0], ids)
        layers = None if head is None else self._prefix_layers(head)
        if head is None or layers is None:
            return None
        # this batch's rows may share more than the template head (the user turn's fixed text, common tags):
        # those tokens are computed once here, at batch size 1, instead of once per row
        common = min(len(row) for row in ids) - 1
        for row in ids[1:]:
            common = next((i for i in range(len(head), common) if row[i] != ids[0][i]), common)
        prefix = ids[0][:common]
        if common > len(head):
            layers = self._extend(layers, prefix[len(head) :])
        suffixes = [row[len(prefix) :] for row in ids]
        width = max(len(s) for s in suffixes)
        # copied into buffers with room for the whole generation, so decode steps write in place (no per-step cat)
        cache = preallocated_cache(layers, len(ids) * n, len(prefix) + width + max_new_tokens, self._model.config)
        pad = tok.pad_token_id
        input_ids = [list(prefix) + [pad] * (width - len(s)) + s for s in suffixes]
        mask = [[1] * len(prefix) + [0] * (width - len(s)) + [1] * len(s) for s in suffixes]
        return {"input_ids": torch.tensor(input_ids, device=self.device),
                "attention_mask": torch.tensor(mask, device=self.device), "cache": cache}

    def _shared_prefix(self, conversation: Conversation, ids: list[list[int]]) -> tuple[int, ...] | None:
        """Token ids every prompt starts with: a cached prefix if one fits, else the conversation before its last turn.

        Always leaves at least one token per row outside the prefix: generate needs a new token to predict from.
        """
        shortest = min(len(row) for row in ids)
        for prefix in self._prefixes:
            if len(prefix) < shortest and all(tuple(row[: len(prefix)]) == prefix for row in ids):
                return prefix
        if len(conversation) < 2:
            return None
        head = self._render_head(conversation[:-1])
        candidate = self._tokenizer(head, add_special_tokens=False)["input_ids"]
        length = min(len(candidate), shortest - 1)
        for row in ids:  # only the tokens the prompts really share: tokenisation at the boundary may differ
            length = next((i for i in range(length) if row[i] != candidate[i]), length)
        return tuple(candidate[:length]) if length >= self.MIN_PREFIX else None

    def _render_head(self, conversation: Conversation) -> str:
        tok = self._tokenizer
        if tok.chat_template:
            return tok.apply_chat_template(conversation, add_generation_prompt=False, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n" for m in conversation)

    def _prefix_layers(self, prefix: tuple[int, ...]) -> list[tuple[Any, Any]] | None:
        """Per-layer (keys, values) of a template head, computed on first use; None if the model cannot reuse them."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = self._prefixes.get(prefix)
        if layers is None:
            cache = DynamicCache(config=self._model.config)
            # sliding-window or recurrent layers cannot hold a prefix for later reuse this way: plain path instead
            if any(type(layer) is not DynamicLayer for layer in cache.layers) or any(cache.is_linear):
                return None
            self._forward(list(prefix), cache)
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            if len(self._prefixes) >= self.MAX_PREFIXES:
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[prefix] = layers
            self.prefix_builds += 1
        return layers

    def _extend(self, layers: list[tuple[Any, Any]], ids: list[int]) -> list[tuple[Any, Any]]:
        """The keys/values of `layers` followed by `ids` (positions continue after the cached ones)."""
        from transformers import DynamicCache

        cache = DynamicCache(list(layers), config=self._model.config)  # copies: the stored head stays as it is
        self._forward(ids, cache)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _forward(self, ids: list[int], cache: Any) -> None:
        """Fill `cache` with one row of tokens; only the keys/values matter, so skip the vocabulary projection."""
        import inspect

        import torch

        extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self._model.forward).parameters else {}
        self._model(input_ids=torch.tensor([ids], device=self.device), cache=cache, use_cache=True, **extra)
