"""Image captioning for the pair stage (`caption` and `caption+rewrite` strategies), through transformers.

Any image-to-text model `AutoModelForImageTextToText` loads works (BLIP as the original SURD used:
`Salesforce/blip-image-captioning-base` / `-large`). `write_tiny_captioner` writes a tiny random BLIP
with an offline tokenizer for tests and the demo.
"""

from __future__ import annotations

import io
from typing import Any

from surd.errors import StageError
from surd.llm import LLMError, Sampling, model_label
from surd.models import resolve_device


class Captioner:
    """Batched captions: `n` per image, sampled when `sampling.temperature > 0`."""

    def __init__(self, model: str, device: str = "auto", batch_size: int = 16, max_new_tokens: int = 30) -> None:
        self.spec = model
        self.label = model_label(model)
        self.device = device
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.calls = 0
        self._model: Any = None
        self._processor: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None, "_processor": None}

    def setup(self) -> None:
        if self._model is not None:
            return
        import torch
        import transformers
        from transformers import AutoModelForImageTextToText, AutoProcessor

        transformers.utils.logging.disable_progress_bar()  # the executor draws the stage's own progress bar
        self.device = resolve_device(self.device)
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        try:
            self._processor = AutoProcessor.from_pretrained(self.spec)
            model = AutoModelForImageTextToText.from_pretrained(self.spec, dtype=dtype)
        except OSError as e:
            raise StageError(f"caption_model {self.spec!r}: cannot load ({e})") from None
        self._model = model.to(self.device).eval()

    def caption(self, images: list[bytes], n: int, sampling: Sampling) -> list[list[str] | LLMError]:
        import torch
        from PIL import Image

        self.setup()
        out: list[list[str] | LLMError] = [LLMError("not captioned")] * len(images)
        decoded: list[tuple[int, Any]] = []
        for i, data in enumerate(images):
            try:
                with Image.open(io.BytesIO(data)) as img:
                    decoded.append((i, img.convert("RGB")))
            except Exception as e:  # Pillow raises many types for corrupt data
                out[i] = LLMError(f"undecodable image: {type(e).__name__}: {e}")
        sample = sampling.temperature > 0
        extra = {"temperature": sampling.temperature, "top_p": sampling.top_p} if sample else {}
        for start in range(0, len(decoded), self.batch_size):
            chunk = decoded[start : start + self.batch_size]
            inputs = self._processor(images=[img for _, img in chunk], return_tensors="pt").to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
            devices = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(sampling.seed)
                generated = self._model.generate(**inputs, do_sample=sample, num_return_sequences=n,
                                                 max_new_tokens=sampling.max_new_tokens, **extra)
            self.calls += 1
            texts = self._processor.batch_decode(generated, skip_special_tokens=True)
            for j, (i, _) in enumerate(chunk):
                out[i] = [t.strip() for t in texts[j * n : (j + 1) * n]]
        return out
