"""Scorers of generated images, pluggable: `clip` (the default), `attributes`, or any `package.module:factory`.

A scorer is built as `factory(model, device=...)` and has `label`, `metrics` (what it writes into each record),
`primary` (the metric that win rates and the wins-and-losses section rank by) and `score(records, bar)`, which
returns the records with its metrics (and, optionally, a `reading` of the image and `reading_ok`) added.

The `clip` scorer: cosine similarities of L2-normalised open_clip embeddings, image vs narrative / keyword
prompt (what SURD's `clip_*` columns hold). A probe is answered by the alternative with the highest similarity
to the image, each alternative read as "a photo of <alternative>"; `p_correct` is the softmax probability (at
CLIP's own logit scale) of the right one. The `attributes` scorer is `surd experiment`'s trained judge
(`adapter/experiment/judge.py`): it reads each attribute off the image and compares it with the prompt's truth.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from surd.errors import SurdError
from surd.models import OpenClip, load_open_clip

TEXT_TEMPLATE = "a photo of {}"
SCORERS = {"clip": "adapter.eval_scores:ClipEvalScorer", "attributes": "adapter.experiment.judge:AttributeJudge"}


@dataclass(frozen=True)
class Metric:
    """One number per image: `column` of the scored record (default: `name`), shown as `label`."""

    name: str
    label: str
    share: bool = False  # a 0/1 outcome, shown as a percentage
    column: str | None = None

    def value(self, record: dict[str, Any]) -> float | None:
        value = record.get(self.column or self.name)
        return None if value is None else float(value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Scorer(Protocol):
    label: str
    metrics: tuple[Metric, ...]
    primary: str

    def score(self, records: list[dict[str, Any]], bar: Any = None) -> list[dict[str, Any]]: ...


def load_scorer(config: Any, device: str = "cpu") -> Scorer:
    """The scorer an EvalConfig names (`clip` loads `config.clip`; any other loads `config.judge`)."""
    target = SCORERS.get(config.scorer, config.scorer)
    module, sep, name = target.partition(":")
    if not sep:
        raise SurdError(f"--scorer {config.scorer!r}: not one of {', '.join(SCORERS)} nor `package.module:factory`")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SurdError(f"--scorer {config.scorer!r}: cannot import {target} ({e})") from None
    return factory(config.clip if config.scorer == "clip" else config.judge, device=device)


CLIP_METRICS = (
    Metric("clip_narrative", "CLIP narrative"),
    Metric("clip_keyword", "CLIP keyword"),
    Metric("probe_accuracy", "probe accuracy", share=True, column="probe_correct"),
    Metric("p_correct", "p(correct)"),
)


def _load_open_clip(spec: str, device: str) -> OpenClip:
    """A checkpoint folder or `NAME/PRETRAINED` (`ViT-L-14/openai`, `ViT-L-14//data/clip.bin`), as the score stage."""
    if Path(spec).expanduser().is_dir():
        return load_open_clip(spec, None, device, what="--clip")
    name, sep, pretrained = spec.partition("/")
    if not sep or not pretrained:
        raise SurdError(f"--clip {spec!r}: expected an open_clip folder or NAME/PRETRAINED (e.g. ViT-L-14/openai)")
    return load_open_clip(name, pretrained, device, what="--clip")


class ClipEvalScorer:
    """Normalised image and text embeddings, texts cached (probe alternatives repeat across images)."""

    metrics = CLIP_METRICS
    primary = "clip_narrative"

    def __init__(self, spec: str, device: str = "cpu", batch_size: int = 32) -> None:
        clip = _load_open_clip(spec, device)
        self.model, self.preprocess, self.tokenizer = clip.model, clip.preprocess, clip.tokenizer
        self.label = clip.label
        self.device, self.batch_size = device, batch_size
        self.dtype = next(self.model.parameters()).dtype
        self.logit_scale = float(self.model.logit_scale.exp().item())
        self._texts: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self._texts))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            features = self.model.encode_text(self.tokenizer(chunk).to(self.device)).float()
            for text, feature in zip(chunk, torch.nn.functional.normalize(features, dim=-1).cpu(), strict=True):
                self._texts[text] = feature
        return torch.stack([self._texts[t] for t in texts]) if texts else torch.empty(0)

    @torch.no_grad()
    def image_features(self, paths: list[Path]) -> torch.Tensor:
        out = []
        for start in range(0, len(paths), self.batch_size):
            pixels = torch.stack([self._pixels(p) for p in paths[start : start + self.batch_size]])
            features = self.model.encode_image(pixels.to(self.device, self.dtype)).float()
            out.append(torch.nn.functional.normalize(features, dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def score(self, records: list[dict[str, Any]], bar: Any = None) -> list[dict[str, Any]]:
        return score_images(self, records, bar)

    def _pixels(self, path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            return self.preprocess(image.convert("RGB"))


def score_images(scorer: ClipEvalScorer, records: list[dict[str, Any]], bar: Any = None) -> list[dict[str, Any]]:
    """Add `clip_narrative`, `clip_keyword` and, for probes, `probe_choice`, `probe_correct`, `p_correct`.

    Each record names its image file (`path`), its narrative `prompt`, optional `keyword_prompt`,
    `alternatives` and `answer`.
    """
    scored = []
    for start in range(0, len(records), scorer.batch_size):
        chunk = records[start : start + scorer.batch_size]
        images = scorer.image_features([Path(r["path"]) for r in chunk])
        for record, image in zip(chunk, images, strict=True):
            scored.append({**record, **_scores(scorer, record, image)})
        if bar is not None:
            bar.update(len(chunk))
    return scored


def _scores(scorer: ClipEvalScorer, record: dict[str, Any], image: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {"clip_narrative": float(scorer.text_features([record["prompt"]])[0] @ image)}
    keyword = record.get("keyword_prompt")
    out["clip_keyword"] = float(scorer.text_features([keyword])[0] @ image) if keyword else None
    alternatives = record.get("alternatives") or ()
    if alternatives:
        similarity = scorer.text_features([TEXT_TEMPLATE.format(a) for a in alternatives]) @ image
        probs = torch.softmax(scorer.logit_scale * similarity, dim=0)
        choice = int(similarity.argmax())
        out.update(probe_choice=choice, probe_correct=choice == record["answer"],
                   p_correct=float(probs[record["answer"]]), reading=alternatives[choice],
                   reading_ok=choice == record["answer"])
    else:
        out.update(probe_choice=None, probe_correct=None, p_correct=None, reading=None, reading_ok=None)
    return out
