"""Seconds per optimiser step and peak memory of adapter training: cached latents/text vs recomputing
the VAE and text encoder every step (as the original does). Same math: both paths run
`adapter.train.compute_losses`; only where the latent parameters and text embeddings come from differs.

    python benchmarks/train_step.py --quick                      # CPU: SD 1.5-sized at 256 px + tiny stack
    python benchmarks/train_step.py --device cuda --dtype fp16 --resolution 512 --steps 200 --checkpointing both

Each (stack, checkpointing) runs in its own process; inside it the modes' steps alternate (ABAB...) so
both see the same background load. Memory per step: GPU torch.cuda.max_memory_allocated (reset before
each step); CPU the RSS rise during a step (torch's CPU allocator is invisible to tracemalloc) and the
process's peak RSS. Weights are random: only time and memory mean anything here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from _report import write_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_sd15(dtype: torch.dtype, device: str) -> SimpleNamespace:
    """Randomly initialised modules with Stable Diffusion 1.5's shapes (UNet 860M, VAE 84M, CLIP-L text 123M)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from surd.demo.tiny import clip_tokenizer

    tokenizer = clip_tokenizer(num_merges=49152 - 258)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    stack = SimpleNamespace(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    for module in (unet, vae, text_encoder):
        module.to(device, dtype)
    stack.device = torch.device(device)
    return stack


def build_tiny(work: Path, dtype: torch.dtype, device: str) -> SimpleNamespace:
    from diffusers import DDPMScheduler

    from adapter.inference import load_pipeline
    from surd.demo.tiny import write_tiny_sd

    folder = work / "tiny-sd"
    if not (folder / "model_index.json").exists():
        write_tiny_sd(folder)
    pipe = load_pipeline(str(folder), device=device, dtype=dtype)
    return SimpleNamespace(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                           scheduler=DDPMScheduler.from_config(pipe.scheduler.config), device=torch.device(device))


class _PeakRSS:
    """Polls the process RSS in a thread (torch's CPU allocator is invisible to tracemalloc)."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.start


def run_stack(stack_name: str, checkpointing: bool, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Build one stack, build the caches (timed), then time the modes' steps interleaved (ABAB...), so
    both modes see the same background load; memory is measured per step (GPU: peak allocated)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from adapter.config import LossSettings
    from adapter.data import (
        AdapterDataset,
        EpochBatches,
        build_latent_cache,
        build_text_cache,
        collate,
        latent_cache,
        read_samples,
        resolve_dataset,
        text_cache,
    )
    from adapter.model import SURAdapter
    from adapter.train import compute_losses
    from surd.demo.tiny import write_tiny_dataset

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype, torch.float32)
    work = Path(args.work)
    resolution = args.resolution if stack_name == "sd15" else 32
    stack = build_sd15(dtype, args.device) if stack_name == "sd15" else build_tiny(work, dtype, args.device)
    for module in (stack.unet, stack.vae, stack.text_encoder):
        module.requires_grad_(False).eval()
    stack.unet.set_attn_processor(AttnProcessor2_0())
    if checkpointing:
        stack.unet.enable_gradient_checkpointing()
    data = work / f"data-{resolution}"
    if not (data / "surd").exists():
        write_tiny_dataset(data, n=8, size=resolution + 16, test=0)
    samples = read_samples(resolve_dataset(data))
    loss = LossSettings(llm_weight=0.0)  # the teacher vector is a cached lookup in both modes: leave it out
    modes = args.modes.split(",")
    cache_dir = Path(tempfile.mkdtemp(prefix="cache-", dir=work))  # fresh: the build is timed too
    t0 = time.perf_counter()
    caches = {"latents": latent_cache(cache_dir, stack.vae, stack_name, resolution),
              "texts": text_cache(cache_dir, stack.text_encoder, stack_name)}
    build_latent_cache(caches["latents"], stack.vae, samples, resolution, [False, True], args.batch_size)
    items = [(s.id, s.narrative) for s in samples] + [(s.id, s.keyword) for s in samples]
    build_text_cache(caches["texts"], stack.tokenizer, stack.text_encoder, items)
    cache_build_s = time.perf_counter() - t0
    cuda = stack.device.type == "cuda"
    runs = {}
    for mode in modes:
        dataset = AdapterDataset(samples, seed=0, resolution=resolution, center_crop=True, random_flip=True,
                                 tokenizer=stack.tokenizer, **(caches if mode == "cached" else {}))
        batches = EpochBatches(len(dataset), args.batch_size, 0)
        torch.manual_seed(0)
        adapter = SURAdapter(int(stack.text_encoder.config.hidden_size)).to(stack.device)
        runs[mode] = SimpleNamespace(
            loader=iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate)),
            adapter=adapter, optimizer=torch.optim.AdamW(adapter.parameters(), lr=1e-4),
            generator=torch.Generator(device=stack.device).manual_seed(0), seconds=[], memory=[])

    def step(run: SimpleNamespace) -> None:
        terms = compute_losses(next(run.loader), run.adapter, stack, stack.scheduler, loss, run.generator)
        terms["loss"].backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)

    steps = args.steps if stack_name == "sd15" else args.tiny_steps
    for i in range(args.warmup + steps):
        for mode in modes:
            run = runs[mode]
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            rss = _PeakRSS()
            t0 = time.perf_counter()
            step(run)
            if cuda:
                torch.cuda.synchronize()
            seconds, rise = time.perf_counter() - t0, rss.stop()
            if i >= args.warmup:
                run.seconds.append(seconds)
                run.memory.append(torch.cuda.max_memory_allocated() if cuda else rise)
    shutil.rmtree(cache_dir, ignore_errors=True)
    results = []
    for mode in modes:
        run = runs[mode]
        result = {"stack": stack_name, "mode": mode, "checkpointing": checkpointing, "resolution": resolution,
                  "batch_size": args.batch_size, "dtype": args.dtype, "device": args.device, "steps": steps,
                  "s_per_step": sum(run.seconds) / steps, "s_per_step_min": min(run.seconds),
                  "cache_build_s": cache_build_s if mode == "cached" else 0.0}
        if cuda:
            result["peak_gpu_gb"] = max(run.memory) / 2**30
        else:
            result["step_rss_rise_gb"] = max(run.memory) / 2**30
            result["process_peak_rss_gb"] = _max_rss_gb()
        results.append(result)
    return results


def _max_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def markdown(results: list[dict[str, Any]], header: str) -> str:
    gpu = any("peak_gpu_gb" in r for r in results)
    memory = "peak GPU GB (max allocated)" if gpu else "RSS rise in a step GB | process peak RSS GB"
    lines = [header, "", f"| stack | res | grad ckpt | mode | s/step (mean) | s/step (min) | speed-up | {memory} | "
             "cache build s |", "|---|---|---|---|---|---|---|---|" + ("" if gpu else "---|") + "---|"]
    for r in results:
        ref = next((o for o in results if o["stack"] == r["stack"] and o["checkpointing"] == r["checkpointing"]
                    and o["mode"] == "recompute"), None)
        speed = f"{ref['s_per_step'] / r['s_per_step']:.2f}x" if ref else "-"
        mem = f"{r['peak_gpu_gb']:.2f}" if gpu else f"{r['step_rss_rise_gb']:.2f} | {r['process_peak_rss_gb']:.2f}"
        lines.append(f"| {r['stack']} | {r['resolution']} | {'on' if r['checkpointing'] else 'off'} | {r['mode']} | "
                     f"{r['s_per_step']:.3f} | {r['s_per_step_min']:.3f} | {speed} | {mem} | "
                     f"{r['cache_build_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 timed SD 1.5-sized steps per mode, 20 tiny ones")
    parser.add_argument("--stacks", default="sd15,tiny")
    parser.add_argument("--modes", default="recompute,cached")
    parser.add_argument("--checkpointing", choices=["on", "off", "both"], default="on")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--resolution", type=int, default=256, help="SD 1.5-sized stack (tiny: 32 px)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps, SD 1.5-sized")
    parser.add_argument("--tiny-steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--work", default=str(ROOT / "bench-out" / "train_step"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    parser.add_argument("--one", nargs=2, metavar=("STACK", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.tiny_steps = 4, 20
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        stack, ckpt = args.one
        print("RESULT " + json.dumps(run_stack(stack, ckpt == "on", args)), flush=True)
        return
    results = []
    forwarded = [a for a in sys.argv[1:] if a != "--quick"] + (["--steps", "4", "--tiny-steps", "20"] if args.quick
                                                               else [])
    for stack in args.stacks.split(","):
        for ckpt in (["on", "off"] if args.checkpointing == "both" else [args.checkpointing]):
            # One process per stack and setting, so each process peak is its own.
            proc = subprocess.run([sys.executable, __file__, *forwarded, "--one", stack, ckpt],
                                  capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{stack} / checkpointing {ckpt} failed:\n{proc.stderr[-3000:]}")
            for result in json.loads(lines[-1].removeprefix("RESULT ")):
                results.append(result)
                print(json.dumps(result), flush=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or
                                                                                platform.machine())
    header = (f"{args.device} ({name}), {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}, {args.dtype}, "
              f"batch {args.batch_size}, random weights")
    table = markdown(results, header)
    print(table)
    if args.json:
        write_rows(args.json, title="adapter training step: cached latents/text vs recomputing them every step",
                   workload=header, rows=ratio_rows(results), header=header, results=results)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)


def ratio_rows(results: list[dict]) -> list[dict]:
    """run_all.py rows: cached vs recompute seconds per step, per stack and checkpointing setting."""
    by_key = {(r["stack"], r["checkpointing"], r["mode"]): r for r in results}
    rows = []
    for (stack, ckpt, mode), cached in by_key.items():
        recompute = by_key.get((stack, ckpt, "recompute"))
        if mode != "cached" or recompute is None:
            continue
        rows.append({
            "metric": f"s/step, {stack} {cached['resolution']}px, checkpointing {'on' if ckpt else 'off'}",
            "ours": round(cached["s_per_step"], 4), "baseline": round(recompute["s_per_step"], 4),
            "baseline_name": "recompute VAE + text encoder each step", "higher_is_better": False,
            "target": 1.25 if stack == "sd15" else "reported", "unit": "s",
        })
    return rows


if __name__ == "__main__":
    main()
