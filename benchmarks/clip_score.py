"""Score-stage throughput: the batched stage vs a naive one-image-at-a-time loop, and the fraction of
this machine's compute-bound rate it reaches, for a ViT-B-32-sized open_clip model (random weights).

    python benchmarks/clip_score.py [--quick] [--rows N] [--out bench-out/models.json] [--json PATH]

Compute-bound rate: model FLOPs per row (one image + keyword + candidates as the stage computes them,
counted by torch's FlopCounterMode) x rows/s, divided by a measured fp32 matmul rate (2048^3 GEMMs) on the same threads.
The CPU is shared, so the three measurements are interleaved in rounds and each reports its best round,
both per wall-clock second and per CPU second (the latter is robust to other processes on the machine).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import merge_record, write_rows  # noqa: E402

from surd.score import ScoreConfig  # noqa: E402

K = 2  # narrative candidates per row


def make_rows(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        # smooth colour fields with noise: decodes like a photo, not like a flat PNG
        base = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((512, 512), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        rows.append({
            "id": f"b:{i}", "image": {"bytes": buf.getvalue(), "path": None},
            "keyword_prompt": f"masterpiece, best quality, {i} red apples, wooden table, soft light, still life, 8k",
            "narrative_candidates": [f"{i} red apples lie on a wooden table.", f"A still life of {i} apples."],
        })
    return rows


def measure(fn: Callable[[], int]) -> tuple[float, float]:
    """(units per wall second, units per CPU second); CPU time includes finished child processes."""
    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    wall0, cpu0 = time.perf_counter(), cpu()
    units = fn()
    return units / (time.perf_counter() - wall0), units / max(cpu() - cpu0, 1e-9)


def naive(processor: object, rows: list[dict]) -> int:
    """What a first script would do: decode, preprocess and encode each image and each text on its own."""
    model, preprocess, tokenizer = processor._model, processor._preprocess, processor._tokenizer  # type: ignore
    with torch.no_grad():
        for row in rows:
            img = preprocess(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))[None]
            image = model.encode_image(img, normalize=True)
            for text in [row["keyword_prompt"], *row["narrative_candidates"]]:
                float(image @ model.encode_text(tokenizer([text]), normalize=True).T)
    return len(rows)


def matmul(seconds: float = 3.0, n: int = 2048) -> int:
    """fp32 GEMMs for about `seconds`; returns the FLOPs done."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
    return 2 * n**3 * runs


def flops_per_row(processor: object, row: dict) -> float:
    """FLOPs the stage spends on one row: the image, and the row's texts through the stage's own text path
    (which skips the padding after the longest prompt, so only FLOPs that are really done are counted)."""
    model = processor._model  # type: ignore[attr-defined]
    size = model.visual.image_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(torch.randn(1, 3, *size))
        processor._text_embeddings([row["keyword_prompt"], *row["narrative_candidates"]])  # type: ignore
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and rounds (a shared CPU)")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader decode processes")
    parser.add_argument("--batch", type=int, default=32, help="inference_batch_size")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved measurement rounds (best counts)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "models.json")
    parser.add_argument("--json", type=Path, default=None, help="write the run_all.py row format here instead")
    args = parser.parse_args()
    n = args.rows or (32 if args.quick else 128)
    rounds = args.rounds or (3 if args.quick else 5)
    rows = make_rows(n)
    processor = ScoreConfig(model="ViT-B-32", pretrained=None, device="cpu", num_workers=args.workers,
                            inference_batch_size=args.batch, batch_size=n).build()
    torch.manual_seed(0)
    processor.setup()
    processor.process_batch(rows[: args.batch])  # warm-up (allocator, thread pool)
    naive(processor, rows[:1])
    stage, slow, peak = [], [], []
    for _ in range(rounds):
        stage.append(measure(lambda: len([r for r in processor.process_batch(rows) if isinstance(r, dict)])))
        slow.append(measure(lambda: naive(processor, rows[: max(8, n // 4)])))
        peak.append(measure(matmul))
    flops = flops_per_row(processor, rows[n // 2])
    best = {name: (max(w for w, _ in m), max(c for _, c in m)) for name, m in
            (("stage", stage), ("naive", slow), ("matmul", peak))}
    result = {
        "model": "ViT-B-32 (random weights), fp32, CPU", "threads": torch.get_num_threads(), "rows": n,
        "candidates_per_row": K, "inference_batch_size": args.batch, "num_workers": args.workers, "rounds": rounds,
        "gflops_per_row": round(flops / 1e9, 2),
        "wall": {
            "stage_rows_per_s": round(best["stage"][0], 3), "naive_rows_per_s": round(best["naive"][0], 3),
            "matmul_gflops_per_s": round(best["matmul"][0] / 1e9, 1),
            "speedup": round(best["stage"][0] / best["naive"][0], 2),
            "fraction_of_compute_bound": round(flops * best["stage"][0] / best["matmul"][0], 3),
            "all_rounds": {"stage": [round(w, 3) for w, _ in stage], "naive": [round(w, 3) for w, _ in slow],
                           "matmul_gflops": [round(w / 1e9, 1) for w, _ in peak]},
        },
        "per_cpu_second": {
            "stage_rows": round(best["stage"][1], 3), "naive_rows": round(best["naive"][1], 3),
            "matmul_gflops": round(best["matmul"][1] / 1e9, 1),
            "speedup": round(best["stage"][1] / best["naive"][1], 2),
            "fraction_of_compute_bound": round(flops * best["stage"][1] / best["matmul"][1], 3),
        },
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        wall = result["wall"]
        rows = [
            {"metric": "score stage images/s", "ours": wall["stage_rows_per_s"], "baseline": wall["naive_rows_per_s"],
             "baseline_name": "one image at a time", "target": 3, "unit": "images/s"},
            {"metric": "fraction of compute-bound rate", "ours": wall["fraction_of_compute_bound"],
             "baseline": None, "baseline_name": f"{wall['matmul_gflops_per_s']} GFLOP/s measured matmul",
             "ratio": wall["fraction_of_compute_bound"], "target": 0.5},
        ]
        write_rows(args.json, title="score stage (open_clip) vs a naive per-image loop",
                   workload=f"{n} rows, {K} candidates each, ViT-B-32-sized random model, fp32 CPU, best of {rounds}",
                   rows=rows, result=result)
        return
    merge_record(args.out, "clip_score", result)


if __name__ == "__main__":
    main()
