"""The score stage with a tiny random open_clip model: scores against a direct open_clip computation,
candidate choice, thresholds (absolute, percentile of the run, relative to the keyword), truncation
counts, embeddings, worker processes, and a run through the local executor."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines.local import run_stage
from surd import shards
from surd.demo.tiny import write_tiny_clip
from surd.errors import StageError
from surd.rows import Drop
from surd.schema import DROPPED_SCHEMA, from_rows
from surd.score import ScoreConfig

CANDIDATES = ["A red car on a street.", "A cat asleep on a sofa.", "Green hills under a blue sky.", "Two boats."]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def image(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def rows(n: int = 12) -> list[dict[str, Any]]:
    return [{"id": f"t:{i}", "source_id": str(i), "image": {"bytes": image(i), "path": None},
             "keyword_prompt": f"photo, {i} things, detailed",
             "narrative_candidates": CANDIDATES[i % 4 :] + CANDIDATES[: i % 4]} for i in range(n)]


def reference(model_dir: Path, batch: list[dict[str, Any]]) -> list[tuple[float, list[float]]]:
    """(clip_keyword, candidate similarities) straight from open_clip, one row at a time."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    out = []
    with torch.no_grad():
        for row in batch:
            img = model.encode_image(preprocess(Image.open(io.BytesIO(row["image"]["bytes"])))[None], normalize=True)
            texts = model.encode_text(tokenizer([row["keyword_prompt"], *row["narrative_candidates"]]), normalize=True)
            sims = (img @ texts.T)[0].tolist()
            out.append((sims[0], sims[1:]))
    return out


def config(model: Path, **kw: Any) -> ScoreConfig:
    return ScoreConfig(model=str(model), num_workers=0, inference_batch_size=5, **kw)


def test_tiny_clip_is_a_local_checkpoint_folder(tiny_clip: Path) -> None:
    assert sorted(p.name for p in tiny_clip.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    a = open_clip.create_model(f"local-dir:{tiny_clip}")
    b = open_clip.create_model(f"local-dir:{tiny_clip}")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.visual.conv1.weight, torch.zeros_like(a.visual.conv1.weight))


def test_scores_match_open_clip_and_the_best_candidate_is_chosen(tiny_clip: Path) -> None:
    batch = rows()
    processor = config(tiny_clip).build()
    pickle.dumps(processor)  # shipped to workers before setup()
    out = processor.process_batch(batch)
    expected = reference(tiny_clip, batch)
    for row, (keyword, sims) in zip(out, expected, strict=True):
        assert isinstance(row, dict)
        assert row["clip_keyword"] == pytest.approx(keyword, abs=1e-5)
        assert row["clip_narrative"] == pytest.approx(max(sims), abs=1e-5)
        assert row["narrative_prompt"] == row["narrative_candidates"][int(np.argmax(sims))]
        assert row["clip_model"] == f"local-dir:{tiny_clip.name}"
    # candidates are rotated per row: the chosen one is not simply the first
    assert len({row["narrative_candidates"].index(row["narrative_prompt"]) for row in out}) > 1
    assert processor.process_batch(batch) == out  # deterministic


def test_worker_processes_give_the_same_scores(tiny_clip: Path) -> None:
    batch = rows(20)
    alone = config(tiny_clip).build().process_batch(batch)
    workers = ScoreConfig(model=str(tiny_clip), num_workers=2, inference_batch_size=4).build().process_batch(batch)
    assert [r["clip_narrative"] for r in workers] == pytest.approx([r["clip_narrative"] for r in alone], abs=1e-6)


def test_absolute_and_relative_thresholds_drop_exactly_the_expected_rows(tiny_clip: Path) -> None:
    batch = rows()
    expected = reference(tiny_clip, batch)
    best = [max(s) for _, s in expected]
    threshold = float(np.median(best))
    out = config(tiny_clip, min_narrative=threshold).build().process_batch(batch)
    dropped = [i for i, r in enumerate(out) if isinstance(r, Drop)]
    assert dropped == [i for i, b in enumerate(best) if b < threshold] and 0 < len(dropped) < len(batch)
    assert all(out[i].reason == "narrative_mismatch" and out[i].row["clip_narrative"] < threshold for i in dropped)
    gaps = [k - b for (k, _), b in zip(expected, best, strict=True)]
    gap = float(np.median(gaps))
    out = config(tiny_clip, max_keyword_gap=max(gap, 0.0)).build().process_batch(batch)
    dropped = [i for i, r in enumerate(out) if isinstance(r, Drop)]
    assert dropped == [i for i, g in enumerate(gaps) if g > max(gap, 0.0)]
    assert all(out[i].reason == "narrative_below_keyword" for i in dropped)


def test_percentile_threshold_is_over_the_whole_run(tiny_clip: Path) -> None:
    batch = rows(16)
    best = [max(s) for _, s in reference(tiny_clip, batch)]
    cutoff = float(np.percentile(best, 25))
    processor = config(tiny_clip, min_narrative_percentile=25).build()
    assert "image" in processor.plan_columns
    with pytest.raises(StageError, match="plan"):
        processor.process_batch(batch[:2])
    index = from_rows(batch).select(list(processor.plan_columns))
    processor.plan(iter(index.to_batches(max_chunksize=5)))  # streamed (the executor may pass a Table too)
    assert processor.cutoff == pytest.approx(cutoff, abs=1e-5)
    worker = pickle.loads(pickle.dumps(processor))  # what the executor ships: decisions, no model
    worker.setup()
    out = worker.process_batch(batch[:8]) + worker.process_batch(batch[8:])  # any batching, same decisions
    dropped = [i for i, r in enumerate(out) if isinstance(r, Drop)]
    assert dropped == [i for i, b in enumerate(best) if b < cutoff] and len(dropped) == 4
    assert {out[i].reason for i in dropped} == {"narrative_below_percentile"}


def test_bad_images_truncation_and_rows_without_narratives(tiny_clip: Path) -> None:
    batch = rows(3)
    batch[0]["image"] = {"bytes": b"not an image", "path": None}
    batch[1]["image"] = None
    batch[2]["keyword_prompt"] = ", ".join(["very long keyword prompt"] * 40)
    batch.append({"id": "t:nonarr", "image": {"bytes": image(9), "path": None}, "keyword_prompt": "a dog"})
    processor = config(tiny_clip, min_narrative=0.99).build()
    out = processor.process_batch(batch)
    assert [r.reason for r in out[:2]] == ["undecodable_image", "no_image"]  # type: ignore[union-attr]
    assert isinstance(out[2], Drop) and out[2].reason == "narrative_mismatch"
    assert isinstance(out[3], dict) and out[3]["clip_narrative"] is None and out[3]["clip_keyword"] is not None
    assert processor.counters["keyword_truncated"] == 1 and processor.counters["narrative_truncated"] == 0


def test_save_embeddings_are_float16_keyed_by_id(tiny_clip: Path) -> None:
    processor = config(tiny_clip, save_embeddings=True).build()
    out = processor.process_batch(rows(4))
    table = processor.take_side_tables()["embeddings"]
    assert processor.take_side_tables() == {}
    assert table.column("id").to_pylist() == [r["id"] for r in out]
    assert table.schema.field("image_embedding").type == pa.list_(pa.float16())
    for row, emb in zip(out, table.to_pylist(), strict=True):
        sim = float(np.dot(np.array(emb["image_embedding"], np.float32), np.array(emb["narrative_embedding"])))
        assert sim == pytest.approx(row["clip_narrative"], abs=2e-3)
    assert config(tiny_clip).build().take_side_tables() == {}


def test_missing_model_is_a_stage_error_naming_it() -> None:
    with pytest.raises(StageError, match="ViT-B-32"):
        ScoreConfig(model="ViT-B-32", pretrained="no-such-tag").build().setup()


def test_score_stage_through_the_local_executor_with_workers(tiny_clip: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    batch = rows(12)
    for k in range(3):  # a finished pair stage of three shards
        shards.commit_shard(run / "pair", f"part-{k:05d}", from_rows(batch[4 * k : 4 * k + 4]),
                            DROPPED_SCHEMA.empty_table(), {"in": 4})
    shards.write_manifest(run / "pair", "pair")
    stats = run_stage(run, "score", config(tiny_clip, min_narrative_percentile=50), workers=2, progress=False)
    assert stats["kept"] == 6 and stats["dropped"] == {"narrative_below_percentile": 6}
    best = [max(s) for _, s in reference(tiny_clip, batch)]
    kept = shards.read_stage_table(run / "score").column("id").to_pylist()
    assert sorted(kept) == sorted(r["id"] for r, b in zip(batch, best, strict=True) if b >= np.median(best))


def test_saved_embeddings_are_written_per_shard_by_the_executor(tiny_clip: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    batch = rows(8)
    for k in range(2):
        shards.commit_shard(run / "pair", f"part-{k:05d}", from_rows(batch[4 * k : 4 * k + 4]),
                            DROPPED_SCHEMA.empty_table(), {"in": 4})
    shards.write_manifest(run / "pair", "pair")
    run_stage(run, "score", config(tiny_clip, save_embeddings=True), progress=False)
    for k in range(2):
        side = pq.read_table(shards.side_path(run / "score", "embeddings", f"part-{k:05d}"))
        assert side.column("id").to_pylist() == [r["id"] for r in batch[4 * k : 4 * k + 4]]
    # Side files are not kept-row shards: the stage still has exactly its two shards.
    assert shards.shard_names(run / "score") == ["part-00000", "part-00001"]


def test_trimmed_text_encoding_equals_open_clips_full_context(tiny_clip: Path) -> None:
    from surd.score import encode_text_trimmed

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_clip}")
    model.eval()
    texts = ["a cat", "masterpiece, best quality, a red car on a rainy street at night, neon, 8k", "x " * 90]
    tokens = tokenizer(texts)
    with torch.no_grad():
        full = model.encode_text(tokens, normalize=True)
        trimmed = encode_text_trimmed(model, tokens)
        # the short prompts alone: a shorter batch is trimmed further and must still agree
        short = encode_text_trimmed(model, tokens[:1])
    assert torch.allclose(trimmed, full, atol=1e-5)
    assert torch.allclose(short, full[:1], atol=1e-5)
