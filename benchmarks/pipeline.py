"""Rows/s of `collect` (folder source) and `clean` on a folder of small generated images, 1 vs 2 workers.

    python benchmarks/pipeline.py [--images 10000] [--quick] [--json out.json]

The images are PNGs with A1111 `parameters` chunks (64-128 px), generated once into bench-out/.
Each configuration runs into a fresh run folder, so nothing is resumed from a previous run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

from _report import write_rows  # noqa: E402

from pipelines.collect import collect
from pipelines.local import run_stage
from pipelines.registry import stage_config
from surd.demo import make_bench_images
from surd.sources import source_config

ROOT = Path(__file__).resolve().parents[1]


def bench(images: Path, work: Path, workers: int, rows_per_shard: int) -> dict[str, float]:
    out = work / f"run-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    config = source_config({"type": "folder", "path": str(images), "rows_per_shard": rows_per_shard})
    t0 = time.perf_counter()
    stats = collect(out, config, workers=workers, progress=False)
    t1 = time.perf_counter()
    clean = run_stage(out, "clean", stage_config("clean", {}), workers=workers, progress=False)
    t2 = time.perf_counter()
    return {
        "workers": workers,
        "rows": stats["in"],
        "collect_rows_per_s": stats["in"] / (t1 - t0),
        "clean_rows_per_s": clean["in"] / (t2 - t1),
        "collect_s": t1 - t0,
        "clean_s": t2 - t1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="accepted for run_all.py; the workload stays 10,000 "
                        "images (about a minute), since worker start-up would dominate a smaller one")
    parser.add_argument("--rows-per-shard", type=int, default=250)
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "pipeline")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    n = args.images
    images = args.work / f"images-{n}"
    if not (images / ".complete").exists():
        shutil.rmtree(images, ignore_errors=True)
        make_bench_images(images, n, seed=0)
        (images / ".complete").write_text("")
    results = [bench(images, args.work, w, args.rows_per_shard) for w in (1, 2)]
    print(f"{n} images, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"{'workers':>7} {'collect rows/s':>15} {'clean rows/s':>13}")
    for r in results:
        print(f"{r['workers']:>7} {r['collect_rows_per_s']:>15.0f} {r['clean_rows_per_s']:>13.0f}")
    speedup = {k: results[1][k] / results[0][k] for k in ("collect_rows_per_s", "clean_rows_per_s")}
    print(f"2 vs 1 workers: collect x{speedup['collect_rows_per_s']:.2f}, clean x{speedup['clean_rows_per_s']:.2f}")
    if args.json:
        rows = [
            {"metric": f"{stage} rows/s, 2 workers vs 1", "ours": results[1][f"{stage}_rows_per_s"],
             "baseline": results[0][f"{stage}_rows_per_s"], "baseline_name": "1 worker", "unit": "rows/s",
             "target": "reported (issue 2)"}
            for stage in ("collect", "clean")
        ]
        write_rows(args.json, title="surd run on a folder of small images: collect and clean",
                   workload=f"{n} PNGs 64-128 px with A1111 metadata, {args.rows_per_shard} rows per shard",
                   rows=rows, results=results)


if __name__ == "__main__":
    main()
