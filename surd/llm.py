"""LLM backends for the pair stage, versioned prompt templates, and the request cache.

Backends take chat conversations (lists of `{"role", "content"}` messages) and return `n` sampled
completions per conversation:

- `TransformersLLM`: any causal LM by hub id, folder or GGUF file (`surd.models.resolve_llm`), the
  tokenizer's chat template, batched `generate` with left padding;
- `OpenAILLM`: any OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, llama.cpp server, Ollama,
  TGI) with a concurrency limit, timeouts and retries; the API key comes from an environment variable.

Both are picklable before `setup()` (models and HTTP clients are created there, in the worker).
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from surd.errors import StageError, SurdError
from surd.models import resolve_llm

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


def torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class TransformersLLM:
    """A local causal LM through transformers; fp16 on GPU, fp32 on CPU."""

    def __init__(self, model: str, device: str = "auto", batch_size: int = 16) -> None:
        self.spec = model
        self.label = model_label(model)
        self.device = device
        self.batch_size = batch_size
        self.calls = 0  # generate() calls, for stats and tests
        self._model: Any = None
        self._tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None, "_tokenizer": None}

    def setup(self) -> None:
        if self._model is not None:
            return
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()  # the executor draws the stage's own progress bar
        location = resolve_llm(self.spec)
        self.device = torch_device(self.device)
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
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            devices = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(sampling.seed)  # reproducible sampling without touching the caller's RNG
                extra = {"temperature": sampling.temperature, "top_p": sampling.top_p} if sample else {}
                generated = model.generate(
                    **enc, do_sample=sample, num_return_sequences=n, max_new_tokens=sampling.max_new_tokens,
                    pad_token_id=tok.pad_token_id, **extra,
                )
            self.calls += 1
            decoded = tok.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            out.extend(decoded[i * n : (i + 1) * n] for i in range(len(chunk)))
        return out


class OpenAILLM:
    """An OpenAI-compatible chat-completions endpoint: one request per candidate, `concurrency` in flight."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, model: str, base_url: str, api_key_env: str | None = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout_s: float = 60.0, retries: int = 4, backoff_s: float = 0.5) -> None:
        self.label = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        self.concurrency, self.timeout_s, self.retries, self.backoff_s = concurrency, timeout_s, retries, backoff_s
        self.calls = 0  # HTTP requests sent, retries included
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock: threading.Lock | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_pool": None, "_lock": None}

    def setup(self) -> None:
        if self._client is not None:
            return
        import os

        import httpx

        headers = {}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self._client = httpx.Client(headers=headers, timeout=self.timeout_s, limits=limits)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="surd-llm")
        self._lock = threading.Lock()

    def generate(self, conversations: list[Conversation], n: int, sampling: Sampling) -> list[list[str] | LLMError]:
        self.setup()
        assert self._pool is not None
        futures = [[self._pool.submit(self._complete, c, sampling, sampling.seed + j) for j in range(n)]
                   for c in conversations]
        out: list[list[str] | LLMError] = []
        for row in futures:
            try:
                out.append([f.result() for f in row])
            except LLMError as e:
                out.append(e)
        return out

    def _complete(self, conversation: Conversation, sampling: Sampling, seed: int) -> str:
        import httpx

        body = {"model": self.label, "messages": conversation, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "max_tokens": sampling.max_new_tokens, "seed": seed, "n": 1}
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, problem))
            with self._lock:  # type: ignore[union-attr]
                self.calls += 1
            try:
                response = self._client.post(self.url, json=body)
            except httpx.TimeoutException:
                problem = f"timeout after {self.timeout_s}s"
                continue
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
                continue
            if response.status_code in (401, 403, 404):
                # configuration errors: every row would fail the same way, so stop the stage with a clear message
                raise StageError(f"pair: {self.url} answered HTTP {response.status_code} "
                                 f"(check base_url, model {self.label!r} and the key in ${self.api_key_env})")
            if response.status_code in self.RETRY_STATUS:
                problem = f"HTTP {response.status_code}"
                retry_after = response.headers.get("retry-after", "")
                if retry_after.replace(".", "", 1).isdigit():
                    problem += f" retry-after={retry_after}"
                continue
            if response.status_code >= 400:
                raise LLMError(f"HTTP {response.status_code}: {response.text[:200]}")
            try:
                content = response.json()["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError(f"content is {type(content).__name__}")
                return content
            except (ValueError, KeyError, IndexError, TypeError) as e:
                problem = f"malformed reply ({type(e).__name__}: {e})"
        raise LLMError(f"{self.retries + 1} attempts failed; last: {problem}")

    def _delay(self, attempt: int, problem: str) -> float:
        if "retry-after=" in problem:
            return min(float(problem.rsplit("=", 1)[1]), 60.0)
        # exponential backoff with jitter, so many workers hitting one server do not retry in lockstep
        return min(self.backoff_s * 2 ** (attempt - 1), 30.0) * (0.5 + random.random() / 2)


# ---------------------------------------------------------------- tiny model for tests and the demo

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_llm(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM plus a byte-level BPE tokenizer with a chat template, all offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [(resources.files("surd") / "templates" / f"{t}.yaml").read_text()
              for t in ("rewrite-v1", "caption-rewrite-v1")]
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<|im_end|>",
                                        bos_token="<|im_start|>", chat_template=CHATML)
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    return out
