"""Images/s of the `fetch` stage next to img2dataset: same loopback server, URL list and concurrency.

    python benchmarks/fetch.py [--images 4000] [--concurrency 32] [--repeats 5]

Neither side resizes. surd decodes every image fully (its validation) and writes Parquet shards via
the local executor; img2dataset runs with `--resize_mode no --skip_reencode True` (it still decodes
with OpenCV to check the image, but writes the original bytes) into Parquet, one process with
`--thread_count` = our concurrency. img2dataset is timed from its own shard stats (start to end),
so its interpreter start-up does not count against it; surd is timed around `run_stage`.
img2dataset pins pandas<3, so it lives in its own venv: .cache/img2dataset-venv (made on first use).
Results: docs/benchmarks-fetch.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _report import write_rows  # noqa: E402

from pipelines.local import run_stage
from surd import shards
from surd.fetch import FetchConfig
from surd.schema import DROPPED_SCHEMA, from_rows

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".cache" / "img2dataset-venv"


def start_server(images: int, size: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, str(ROOT / "tests" / "civitai_server.py"), "--lifetime", "1800",
           "--warm", str(images), "--size", str(size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}"


def img2dataset_bin() -> Path:
    binary = VENV / "bin" / "img2dataset"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "img2dataset"], check=True)
    return binary


def run_surd(urls: list[str], work: Path, concurrency: int) -> dict[str, float]:
    run = work / "surd-run"
    shutil.rmtree(run, ignore_errors=True)
    collect = run / "collect"
    per_shard = 1000
    for k in range(0, len(urls), per_shard):
        chunk = enumerate(urls[k : k + per_shard], k)
        rows = [{"id": f"bench:{i}", "source": "bench", "image_url": u} for i, u in chunk]
        stats = {"in": len(rows), "kept": len(rows), "dropped": {}, "seconds": 0.0}
        shards.commit_shard(collect, f"bench/part-{k // per_shard:05d}", from_rows(rows), from_rows([], DROPPED_SCHEMA),
                            stats)
    shards.write_manifest(collect, "collect")
    config = FetchConfig(concurrency=concurrency, per_host=concurrency, allowed_hosts=["127.0.0.1"],
                         allow_private_hosts=True, max_retries=0)
    start, cpu = time.perf_counter(), time.process_time()  # process_time counts the download thread too
    result = run_stage(run, "fetch", config, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"images": result["kept"], "seconds": seconds, "images_per_s": result["kept"] / seconds,
            "cpu_ms_per_image": 1000 * cpu / max(result["kept"], 1)}


def run_img2dataset(urls: list[str], work: Path, concurrency: int) -> dict[str, float]:
    out = work / "img2dataset-out"
    shutil.rmtree(out, ignore_errors=True)
    url_list = work / "urls.txt"
    url_list.write_text("\n".join(urls) + "\n")
    cmd = [str(img2dataset_bin()), "--url_list", str(url_list), "--input_format", "txt", "--output_folder", str(out),
           "--output_format", "parquet", "--processes_count", "1", "--thread_count", str(concurrency),
           "--resize_mode", "no", "--skip_reencode", "True", "--encode_format", "jpg", "--retries", "0",
           "--number_sample_per_shard", "1000", "--enable_wandb", "False", "--timeout", "20"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    wall, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    wall, cpu = time.perf_counter() - wall, _children_cpu() - cpu
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    successes = sum(s["successes"] for s in stats)
    seconds = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return {"images": successes, "seconds": seconds, "images_per_s": successes / seconds, "wall_seconds": wall,
            "cpu_seconds_total": cpu}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=128, help="side of the served JPEGs")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "fetch")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-fetch")
    parser.add_argument("--quick", action="store_true", help="1,500 images, 3 alternating repeats")
    parser.add_argument("--json", type=Path, default=None, help="write the run_all.py row format here instead")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = min(args.images, 1500), min(args.repeats, 3)
    args.work.mkdir(parents=True, exist_ok=True)
    server, base = start_server(args.images, args.size)
    try:
        urls = [f"{base}/img/ok/{i}.jpg?size={args.size}" for i in range(args.images)]
        # start-up CPU of img2dataset (imports, processes), subtracted from its per-image CPU below
        startup = run_img2dataset(urls[:10], args.work, args.concurrency)["cpu_seconds_total"]
        run_surd(urls[:10], args.work, args.concurrency)  # warm imports on our side too
        surd_runs, i2d_runs = [], []
        for _ in range(args.repeats):  # alternate, so neither side always runs on a warmer machine
            i2d_runs.append(run_img2dataset(urls, args.work, args.concurrency))
            surd_runs.append(run_surd(urls, args.work, args.concurrency))
    finally:
        server.terminate()
        server.wait(timeout=10)
    for r in i2d_runs:
        r["cpu_ms_per_image"] = 1000 * (r["cpu_seconds_total"] - startup) / max(r["images"], 1)
    surd_rate = statistics.median(r["images_per_s"] for r in surd_runs)
    i2d_rate = statistics.median(r["images_per_s"] for r in i2d_runs)
    # each pair ran back to back, under about the same load from the rest of the machine
    pair_ratios = [s["images_per_s"] / i["images_per_s"] for s, i in zip(surd_runs, i2d_runs, strict=True)]
    surd_cpu = statistics.median(r["cpu_ms_per_image"] for r in surd_runs)
    i2d_cpu = statistics.median(r["cpu_ms_per_image"] for r in i2d_runs)
    result = {
        "images": args.images, "size": args.size, "concurrency": args.concurrency, "repeats": args.repeats,
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "surd_images_per_s": round(surd_rate, 1), "img2dataset_images_per_s": round(i2d_rate, 1),
        "ratio": round(statistics.median(pair_ratios), 2), "surd_cpu_ms_per_image": round(surd_cpu, 3),
        "img2dataset_cpu_ms_per_image": round(i2d_cpu, 3), "load_average": os.getloadavg(),
        "surd_runs": surd_runs, "img2dataset_runs": i2d_runs,
    }
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_runs")}, indent=2))
    if args.json is None:
        write_report(args.out, result)
        return
    row = {"metric": "images/s", "ours": result["surd_images_per_s"], "baseline": result["img2dataset_images_per_s"],
           "baseline_name": "img2dataset", "ratio": result["ratio"], "target": 1.2, "unit": "images/s"}
    write_rows(args.json, title="fetch: surd vs img2dataset, same URLs and concurrency, no resizing",
               workload=f"{args.images} {args.size}px JPEGs from a loopback server, concurrency {args.concurrency}, "
                        f"median of {args.repeats} back-to-back pairs",
               rows=[row], result=result)


def write_report(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Fetch benchmark: surd vs img2dataset",
        "",
        "Written by `benchmarks/fetch.py`. Same loopback server (`tests/civitai_server.py`, its own process), the",
        f"same {result['images']} URLs ({result['size']}px JPEGs), concurrency {result['concurrency']}, no resizing;",
        f"medians of {result['repeats']} alternating runs on {result['cpus']} CPUs ({result['machine']}).",
        "",
        "| tool | images/s | CPU ms per image |",
        "|---|---|---|",
        f"| surd fetch | {result['surd_images_per_s']} | {result['surd_cpu_ms_per_image']} |",
        f"| img2dataset | {result['img2dataset_images_per_s']} | {result['img2dataset_cpu_ms_per_image']} |",
        "",
        f"Ratio surd / img2dataset (median over back-to-back pairs): **{result['ratio']}x** (target: at least 1.2x).",
        "",
        "The machine is shared: load average at the end of the run was "
        f"{', '.join(f'{x:.1f}' for x in result['load_average'])}; throughput moves with it, CPU per image much less.",
        "CPU per image: surd's whole process (download thread included); img2dataset's child processes, less the",
        "CPU of a 10-image run (its start-up). Per-run numbers are in the JSON file beside this one.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
