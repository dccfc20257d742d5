"""Prompt encoding for Stable Diffusion 1.x/2.x (one CLIP text encoder) and SDXL (two), as the stock diffusers
pipelines encode prompts, so what the adapter trains on is exactly what it sees at inference.

    SD 1.x/2.x  hidden = text_encoder(ids).last_hidden_state                          [B, 77, D]
    SDXL        hidden = [text_encoder(ids).hidden_states[-2] ; text_encoder_2(ids_2).hidden_states[-2]]
                pooled = text_encoder_2(ids_2).text_embeds                            [B, 77, D1 + D2], [B, P]
                time_ids = (original h, w, crop top, left, target h, w)               [B, 6]
The attention mask [B, 77] is the first tokenizer's (both CLIP tokenizers split a prompt the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TextBatch:
    """Encoded prompts: hidden states, the tokenizer's attention mask, SDXL's pooled embedding."""

    hidden: torch.Tensor  # [B, T, D]
    mask: torch.Tensor  # [B, T], 1 for BOS, the prompt and EOS
    pooled: torch.Tensor | None = None  # [B, P] (SDXL)

    def rows(self, index: torch.Tensor) -> TextBatch:
        return TextBatch(self.hidden[index], self.mask[index], None if self.pooled is None else self.pooled[index])

    def where(self, replace: torch.Tensor, other: TextBatch) -> TextBatch:
        """Rows where `replace` [B] is True taken from `other` (one row, broadcast)."""
        r = replace.to(self.hidden.device)

        def pick(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            if a is None or b is None:
                return a
            return torch.where(r.view(-1, *[1] * (a.dim() - 1)), b.to(a.device, a.dtype).expand_as(a), a)

        return TextBatch(pick(self.hidden, other.hidden), pick(self.mask, other.mask), pick(self.pooled, other.pooled))


@dataclass
class PromptEncoder:
    """The tokenizer(s) and frozen text encoder(s) of a pipeline (SD: one of each; SDXL: two)."""

    tokenizer: Any
    text_encoder: Any
    tokenizer_2: Any = None
    text_encoder_2: Any = None

    @classmethod
    def of(cls, pipe: Any) -> PromptEncoder:
        return cls(pipe.tokenizer, pipe.text_encoder, getattr(pipe, "tokenizer_2", None),
                   getattr(pipe, "text_encoder_2", None))

    @property
    def sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def dim(self) -> int:
        """The width of what conditions the UNet (SDXL: both encoders' widths side by side)."""
        second = int(self.text_encoder_2.config.hidden_size) if self.sdxl else 0
        return int(self.text_encoder.config.hidden_size) + second

    @property
    def pooled_dim(self) -> int | None:
        return int(self.text_encoder_2.config.projection_dim) if self.sdxl else None

    @property
    def device(self) -> torch.device:
        return (self.text_encoder_2 if self.sdxl else self.text_encoder).device

    def config_dicts(self) -> list[dict[str, Any]]:
        return [e.config.to_dict() for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask [B, 77], padded the way the pipelines pad (SDXL: `ids_2` too)."""
        ids, mask = tokenize(self.tokenizer, texts)
        tokens = {"ids": ids, "mask": mask}
        if self.sdxl:
            tokens["ids_2"] = tokenize(self.tokenizer_2, texts)[0]
        return tokens

    @torch.no_grad()
    def encode(self, tokens: dict[str, torch.Tensor]) -> TextBatch:
        """Hidden states (and SDXL's pooled embedding) of tokenized prompts."""
        mask = tokens["mask"]
        if not self.sdxl:
            return TextBatch(text_embeds(self.text_encoder, tokens["ids"], mask), mask.to(self.device))
        hidden = []
        pooled = None
        for encoder, ids in ((self.text_encoder, tokens["ids"]), (self.text_encoder_2, tokens["ids_2"])):
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected EOS state (text_embeds)
        dtype = self.text_encoder_2.dtype
        return TextBatch(torch.cat([h.to(dtype) for h in hidden], dim=-1), mask.to(self.device), pooled)

    def __call__(self, texts: Sequence[str]) -> TextBatch:
        return self.encode(self.tokenize(texts))


def tokenize(tokenizer: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [B, 77], padded the way Stable Diffusion pipelines pad."""
    out = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return out.input_ids, out.attention_mask


def text_embeds(text_encoder: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden state, called as diffusers' `encode_prompt` calls it (SD 1.x/2.x)."""
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    device = text_encoder.device
    return text_encoder(ids.to(device), attention_mask=mask.to(device) if use_mask else None)[0]


def time_ids(original: tuple[int, int], crop_top_left: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning vector [6]: original size (h, w), crop top-left (y, x), target size (h, w)."""
    return torch.tensor([*original, *crop_top_left, *target], dtype=torch.float32)


def crop_time_ids(width: int | None, height: int | None, resolution: int) -> torch.Tensor:
    """time_ids of an image resized (short side) to `resolution` and centre-cropped, as adapter/data.py does."""
    if not width or not height:
        return time_ids((resolution, resolution), (0, 0), (resolution, resolution))
    scale = resolution / min(width, height)
    nw, nh = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    return time_ids((height, width), (round((nh - resolution) * 0.5), round((nw - resolution) * 0.5)),
                    (resolution, resolution))
