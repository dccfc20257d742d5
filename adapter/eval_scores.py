"""CLIP scores of generated images: image vs narrative / keyword prompt, and zero-shot probe answers.

Scores are cosine similarities of L2-normalised open_clip embeddings (what SURD's `clip_*` columns hold).
A probe is answered by the alternative with the highest similarity to the image, each alternative read as
"a photo of <alternative>"; `p_correct` is the softmax probability (at CLIP's own logit scale) of the
right one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from surd.errors import SurdError
from surd.models import OpenClip, load_open_clip

TEXT_TEMPLATE = "a photo of {}"


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
                   p_correct=float(probs[record["answer"]]))
    else:
        out.update(probe_choice=None, probe_correct=None, p_correct=None)
    return out
