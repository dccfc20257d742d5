"""The score stage: open_clip image-text similarity and the semantic correction.

For each row: one image embedding; text embeddings for the keyword prompt and every narrative
candidate; cosine similarities into `clip_keyword` and `clip_narrative` (of the best candidate, which
becomes `narrative_prompt`), `clip_model` naming the model. Images are decoded and preprocessed in
DataLoader worker processes (`num_workers`), the model runs under `torch.inference_mode` (fp16 on GPU).

Semantic correction drops rows whose narrative does not match the image, each with its reason:
- `narrative_mismatch`: `clip_narrative < min_narrative` (absolute);
- `narrative_below_percentile`: `clip_narrative` below the `min_narrative_percentile`-th percentile of the
  whole run (DataComp found relative thresholds more robust). A percentile needs every row's score before
  any row is judged, so the stage then scores all rows in `plan()` (the executor calls it once, before any
  batch, with the plan columns of the whole input) and `process_batch` only applies the decisions;
- `narrative_below_keyword`: `clip_keyword - clip_narrative > max_keyword_gap` (relative to the keyword prompt).

Prompts longer than the text context are truncated by the tokenizer and counted (`keyword_truncated`,
`narrative_truncated` in the stage stats). With `save_embeddings`, float16 embeddings keyed by `id` are
handed to the executor through `take_side_tables()` (the executor owns all I/O).
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from surd.errors import StageError
from surd.models import clip_label, load_open_clip
from surd.rows import Drop, StageConfig

EMBEDDINGS_SCHEMA = pa.schema([
    ("id", pa.string()), ("source_id", pa.string()), ("image_embedding", pa.list_(pa.float16())),
    ("keyword_embedding", pa.list_(pa.float16())), ("narrative_embedding", pa.list_(pa.float16())),
])
_ADDRESS = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")  # keep drop details free of memory addresses
PLAN_COLUMNS = ("id", "source_id", "image", "keyword_prompt", "narrative_prompt", "narrative_candidates")


class ScoreConfig(StageConfig):
    """Recipe section `score:`."""

    batch_size: int = Field(256, ge=1, description="rows per call of process_batch")
    model: str = Field("ViT-L-14", description="open_clip model name, or a folder with open_clip_config.json "
                       "and weights (a local checkpoint, e.g. from `surd models tiny`)")
    pretrained: str | None = Field("openai", description="open_clip pretrained tag or a checkpoint file; "
                                   "ignored for a folder; none: random weights")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: fp16 on GPU, fp32 on CPU")
    inference_batch_size: int = Field(64, ge=1, description="images (and texts) per forward pass")
    num_workers: int = Field(2, ge=0, le=64, description="DataLoader processes decoding and preprocessing images")
    min_narrative: float | None = Field(None, ge=-1, le=1, description="drop rows whose clip_narrative is below")
    min_narrative_percentile: float | None = Field(None, gt=0, lt=100,
                                                   description="drop rows below this percentile of the run")
    max_keyword_gap: float | None = Field(None, ge=0, description="drop rows whose clip_narrative is more than "
                                          "this below clip_keyword")
    save_embeddings: bool = Field(False, description="hand float16 embeddings keyed by id to the executor")

    def build(self) -> Scorer:
        return Scorer(self)


@dataclass
class Scored:
    """One row's scores (or why it could not be scored)."""

    problem: tuple[str, str] | None = None
    clip_keyword: float | None = None
    sims: tuple[float, ...] = ()
    keyword_truncated: bool = False
    narrative_truncated: int = 0
    embeddings: tuple[Any, Any, Any] | None = None  # float16 (image, keyword, best narrative)


class _Images:
    """Map-style dataset for the DataLoader: decode + preprocess in the worker processes."""

    def __init__(self, blobs: list[bytes | None], transform: Any) -> None:
        self.blobs, self.transform = blobs, transform

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> tuple[int, Any, str]:
        from PIL import Image

        data = self.blobs[i]
        if not data:
            return i, None, "no_image"
        try:
            with Image.open(io.BytesIO(data)) as img:
                return i, self.transform(img.convert("RGB")), ""
        except Exception as e:  # Pillow raises many types for corrupt data; all mean "cannot decode"
            return i, None, f"{type(e).__name__}: {_ADDRESS.sub('image bytes', str(e))}"


def _as_list(items: list[Any]) -> list[Any]:
    return items


class Scorer:
    """The score stage's processor (see module doc)."""

    plan_streaming = True  # plan() also takes an iterator of RecordBatches: no need to hold every image at once
    on_rows: Callable[[int], None] | None = None  # lent by the executor: rows whose image is embedded

    def __init__(self, config: ScoreConfig) -> None:
        self.config = config
        self.label = clip_label(config.model, config.pretrained)
        self.counters: Counter[str] = Counter()
        self._model: Any = None
        self._planned: dict[tuple[str, str | None], Scored] | None = None
        self._cutoff: float | None = None
        self._side: list[dict[str, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        # shipped to worker processes: the model stays behind (setup reloads it when it is needed)
        return {**self.__dict__, "_model": None, "_tokenizer": None, "_preprocess": None}

    @property
    def plan_columns(self) -> tuple[str, ...]:
        return PLAN_COLUMNS if self.config.min_narrative_percentile is not None else ()

    def setup(self) -> None:
        if self._model is not None or self._planned is not None:
            return
        c = self.config
        clip = load_open_clip(c.model, c.pretrained, c.device, c.precision, what="score: open_clip model",
                              error=StageError)
        self.device, self._tokenizer, self._preprocess = clip.device, clip.tokenizer, clip.preprocess
        self._model = clip.model
        self._dtype = next(clip.model.parameters()).dtype
        self._context = int(getattr(clip.model, "context_length", 77) or 77)

    # ------------------------------------------------------------------ scoring

    def score(self, rows: list[dict[str, Any]]) -> list[Scored]:
        """Scores for `rows` (no thresholds applied)."""
        import torch

        self.setup()
        with torch.inference_mode():
            images = self._image_embeddings([(r.get("image") or {}).get("bytes") for r in rows])
            texts = sorted({t for r in rows for t in [r.get("keyword_prompt"), *_candidates(r)] if t})
            text_emb = dict(zip(texts, self._text_embeddings(texts), strict=True))
        out = []
        for row, image in zip(rows, images, strict=True):
            if isinstance(image, tuple):
                out.append(Scored(problem=image))
                continue
            keyword, candidates = row.get("keyword_prompt"), _candidates(row)
            scored = Scored(
                clip_keyword=float(image @ text_emb[keyword]) if keyword else None,
                sims=tuple(float(image @ text_emb[t]) for t in candidates),
                keyword_truncated=bool(keyword) and self._too_long(keyword),
                narrative_truncated=sum(self._too_long(t) for t in candidates),
            )
            if self.config.save_embeddings:
                best = text_emb[candidates[int(np.argmax(scored.sims))]] if candidates else None
                scored.embeddings = tuple(None if e is None else e.astype(np.float16)  # type: ignore[assignment]
                                          for e in (image, text_emb.get(keyword or ""), best))
            out.append(scored)
        return out

    def _image_embeddings(self, blobs: list[bytes | None]) -> list[Any]:
        """Unit image embeddings (numpy), or (reason, detail) for an image that cannot be used."""
        import torch
        from torch.utils.data import DataLoader

        out: list[Any] = [None] * len(blobs)
        loader = DataLoader(_Images(blobs, self._preprocess), batch_size=self.config.inference_batch_size,
                            num_workers=min(self.config.num_workers, max(1, len(blobs) // 8)),
                            collate_fn=_as_list)
        for items in loader:
            ready = []
            for i, tensor, problem in items:
                if tensor is None:
                    out[i] = ("no_image", "no image bytes") if problem == "no_image" else (
                        "undecodable_image", problem)
                else:
                    ready.append((i, tensor))
            if ready:
                batch = torch.stack([t for _, t in ready]).to(self.device, self._dtype)
                emb = self._model.encode_image(batch, normalize=True).float().cpu().numpy()
                for (i, _), e in zip(ready, emb, strict=True):
                    out[i] = e
            if self.on_rows is not None:  # the images are most of a row's work; its texts follow in bulk
                self.on_rows(len(items))
        return out

    def _text_embeddings(self, texts: list[str]) -> list[Any]:
        out: list[Any] = []
        step = self.config.inference_batch_size
        for start in range(0, len(texts), step):
            tokens = self._tokenizer(texts[start : start + step]).to(self.device)
            out.extend(encode_text_trimmed(self._model, tokens).float().cpu().numpy())
        return out

    def _too_long(self, text: str) -> bool:
        tok = self._tokenizer
        if hasattr(tok, "encode"):  # open_clip's SimpleTokenizer: + start and end tokens
            return len(tok.encode(text)) + 2 > self._context
        if hasattr(tok, "tokenizer"):  # HFTokenizer wrapper
            return len(tok.tokenizer(text)["input_ids"]) > self._context
        return False

    # ------------------------------------------------------------------ whole-run percentile

    def plan(self, index: pa.Table | Iterable[pa.RecordBatch]) -> None:
        """Score every input row once and fix the percentile cutoff (only with `min_narrative_percentile`)."""
        if self.config.min_narrative_percentile is None:
            return
        self._planned = None
        self.setup()
        batches = index.to_batches(self.config.batch_size) if isinstance(index, pa.Table) else index
        planned: dict[tuple[str, str | None], Scored] = {}
        for batch in batches:
            for start in range(0, batch.num_rows, self.config.batch_size):
                rows = batch.slice(start, self.config.batch_size).to_pylist()
                for row, scored in zip(rows, self.score(rows), strict=True):
                    planned[(row["id"], row.get("source_id"))] = scored
        values = [max(s.sims) for s in planned.values() if s.problem is None and s.sims]
        self._cutoff = float(np.percentile(values, self.config.min_narrative_percentile)) if values else None
        self._planned = planned
        self._model = None  # workers only look scores up; free the model before the executor pickles us

    @property
    def cutoff(self) -> float | None:
        return self._cutoff

    # ------------------------------------------------------------------ the stage

    def process_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        if self._planned is not None:
            missing = [r for r in rows if (r["id"], r.get("source_id")) not in self._planned]
            if missing:
                raise StageError(f"score: row {missing[0]['id']!r} was not in the input given to plan()")
            scores = [self._planned[(r["id"], r.get("source_id"))] for r in rows]
        elif self.config.min_narrative_percentile is not None:
            raise StageError("score: min_narrative_percentile needs plan() over the whole input first")
        else:
            scores = self.score(rows)
        return [self._apply(row, scored) for row, scored in zip(rows, scores, strict=True)]

    def _apply(self, row: dict[str, Any], scored: Scored) -> dict[str, Any] | Drop:
        if scored.problem is not None:
            return Drop(*scored.problem)
        self.counters["keyword_truncated"] += int(scored.keyword_truncated)
        self.counters["narrative_truncated"] += scored.narrative_truncated
        out = dict(row)
        out.update(clip_model=self.label, clip_keyword=scored.clip_keyword)
        candidates = _candidates(row)
        if candidates:
            best = int(np.argmax(scored.sims))
            out.update(narrative_prompt=candidates[best], clip_narrative=scored.sims[best])
        else:
            out["clip_narrative"] = None
        if scored.embeddings is not None:
            self._side.append({"id": row["id"], "source_id": row.get("source_id"),
                               **dict(zip(EMBEDDINGS_SCHEMA.names[2:], scored.embeddings, strict=True))})
        problem = self._judge(out)
        return out if problem is None else Drop(*problem, row=out)

    def _judge(self, row: dict[str, Any]) -> tuple[str, str] | None:
        c, narrative, keyword = self.config, row["clip_narrative"], row["clip_keyword"]
        if narrative is None:
            return None  # nothing to judge: rows without a narrative keep their keyword score only
        if c.min_narrative is not None and narrative < c.min_narrative:
            return "narrative_mismatch", f"clip_narrative {narrative:.4f} < min_narrative {c.min_narrative}"
        if self._cutoff is not None and narrative < self._cutoff:
            return ("narrative_below_percentile", f"clip_narrative {narrative:.4f} < percentile "
                    f"{c.min_narrative_percentile} of the run ({self._cutoff:.4f})")
        if c.max_keyword_gap is not None and keyword is not None and keyword - narrative > c.max_keyword_gap:
            return ("narrative_below_keyword", f"clip_narrative {narrative:.4f} < clip_keyword {keyword:.4f} "
                    f"- max_keyword_gap {c.max_keyword_gap}")
        return None

    def take_side_tables(self) -> dict[str, pa.Table]:
        """Embeddings gathered since the last call (empty without `save_embeddings`); the executor writes them."""
        if not self._side:
            return {}
        rows, self._side = self._side, []
        return {"embeddings": pa.Table.from_pylist(rows, schema=EMBEDDINGS_SCHEMA)}


def _candidates(row: dict[str, Any]) -> list[str]:
    candidates = [t for t in row.get("narrative_candidates") or [] if t]
    if not candidates and row.get("narrative_prompt"):
        candidates = [row["narrative_prompt"]]
    return candidates


def encode_text_trimmed(model: Any, tokens: Any) -> Any:
    """`model.encode_text(tokens, normalize=True)` without the padding after the batch's longest prompt.

    CLIP's text tower is causal and pools at the end-of-text token, so the padded tail of the 77-token
    context never influences the result; prompts use a fraction of it, so this skips most text compute.
    Other text towers (non-causal, other pooling) take the library's own path.
    """
    import open_clip
    import torch
    from open_clip.transformer import text_global_pool

    mask = getattr(model, "attn_mask", None)
    if not (isinstance(model, open_clip.model.CLIP) and mask is not None
            and getattr(model, "text_pool_type", None) == "argmax"):
        return model.encode_text(tokens, normalize=True)
    length = max(int((tokens != 0).sum(dim=1).max()), 1)  # pad id 0; the end-of-text token is the largest id
    text = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=mask[:length, :length]))
    x = text_global_pool(x, text, "argmax")
    if model.text_projection is not None:
        proj = model.text_projection
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return torch.nn.functional.normalize(x, dim=-1)
