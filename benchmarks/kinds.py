"""What each adapter kind costs: parameters, seconds per training step and peak memory (gradient checkpointing on
and off), seconds per generated image, and (connector) the LLM's one pass per prompt — on SD 1.5 and SDXL.

    python benchmarks/kinds.py --tiny --threads 1       CPU: the tiny random SD 1.5 / SDXL of surd/demo/tiny.py
    python benchmarks/kinds.py --device cuda            random weights at real size: SD 1.5 at 512 px, SDXL at
                                                        1024 px, a 2048-wide 16-layer LLM (a 1B-class model)

Every training step is `adapter.step.compute_losses` (the loop's own math) on cached inputs (latent parameters,
text embeddings, teacher vectors / token states as the caches hold them), plus backward and AdamW. Images go through
`adapter.inference.generate_images`, guidance on, the same seed for every kind. Weights are random: only time and
memory mean anything here. Each stack runs in its own process, so each process peak is its own.
"""
# run_all: skip (per-kind costs for docs/adapter.md and gpu_check.sh, no baseline)

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _report import write_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ["sur", "paper", "reference-with-defects", "connector"]
LLM_WIDTH, LLM_TOKENS = 2048, 32  # what a connector reads: ~32 content tokens of a 2048-wide LLM


def real_pipeline(stack: str, device: str, dtype: torch.dtype) -> Any:
    """Randomly initialised modules with SD 1.5's or SDXL base's shapes, built on the device."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from surd.demo.tiny import clip_tokenizer

    tokenizer = clip_tokenizer(num_merges=49152 - 258)

    def clip(width: int, layers: int, heads: int, projection: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                              num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                              projection_dim=projection, hidden_act=act, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    with torch.device(device):
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            sample_size=1024 if stack == "sdxl" else 512)
        if stack == "sd15":
            unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
            text_encoder = CLIPTextModel(clip(768, 12, 12, 768, "quick_gelu"))
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        else:
            unet = UNet2DConditionModel(
                sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=CLIPTextModel(clip(768, 12, 12, 768, "quick_gelu")),
                text_encoder_2=CLIPTextModelWithProjection(clip(1280, 32, 20, 1280, "gelu")), tokenizer=tokenizer,
                tokenizer_2=clip_tokenizer(num_merges=49152 - 258, pad_token="!"), unet=unet, scheduler=scheduler)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def teacher(width: int, layers: int, device: str, dtype: torch.dtype) -> Any:
    """A random Llama-style LLM as the connector's teacher (adapter.teacher.Teacher), built in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapter.teacher import Teacher, TeacherInfo
    from surd.demo.tiny import clip_tokenizer

    tokenizer = clip_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=max(1, width // 128), num_key_value_heads=
                         max(1, width // 512), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)
    tokenizer.padding_side = "right"
    return Teacher(TeacherInfo("random", width, layers, {}), model, tokenizer)


def batch(pipe: Any, batch_size: int, resolution: int, llm_width: int) -> dict[str, torch.Tensor]:
    """What one micro-batch holds when every cache is warm (random values of the right shapes)."""
    from adapter.text import PromptEncoder, crop_time_ids

    encoder = PromptEncoder.of(pipe)
    tokens = encoder.tokenize(["a photograph of an astronaut riding a horse on the moon"] * batch_size)
    latent = resolution // 8
    out = {"latent_params": torch.randn(batch_size, 8, latent, latent), "narrative_embeds":
           torch.randn(batch_size, 77, encoder.dim), "narrative_mask": tokens["mask"], "keyword_embeds":
           torch.randn(batch_size, 77, encoder.dim), "keyword_mask": tokens["mask"],
           "teacher": torch.randn(batch_size, llm_width),
           "teacher_tokens": torch.randn(batch_size, LLM_TOKENS, llm_width),
           "teacher_tokens_mask": torch.ones(batch_size, LLM_TOKENS, dtype=torch.long)}
    if encoder.sdxl:
        out["narrative_pooled"] = torch.randn(batch_size, encoder.pooled_dim)
        out["keyword_pooled"] = torch.randn(batch_size, encoder.pooled_dim)
        out["time_ids"] = crop_time_ids(resolution, resolution, resolution).expand(batch_size, 6)
    return out


def _peak(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB on Linux)


def run_stack(stack: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every kind on one stack: training steps (checkpointing on, off), then images."""
    from adapter.config import TrainConfig
    from adapter.inference import AdapterRuntime, load_pipeline
    from adapter.kinds import parameter_counts
    from adapter.step import EmptyPrompt, compute_losses, prepare_frozen
    from adapter.text import PromptEncoder
    from adapter.train import build_adapter
    from surd.demo.tiny import write_tiny_sd, write_tiny_sdxl
    from surd.models import precision_dtype

    device, dtype = args.device, precision_dtype(args.dtype)
    if args.tiny:
        folder = Path(args.work) / stack
        if not (folder / "model_index.json").exists():
            (write_tiny_sd(folder, text_dim=32) if stack == "sd15" else write_tiny_sdxl(folder))
        pipe, resolution, llm = load_pipeline(str(folder), device=device, dtype=dtype), 32, teacher(32, 2, device,
                                                                                                      dtype)
        shape = {"ff_dim": 64, "heads": 4, "width": 32, "tokens": 8, "depth": 2}
    else:
        pipe, resolution = real_pipeline(stack, device, dtype), 1024 if stack == "sdxl" else 512
        llm, shape = teacher(LLM_WIDTH, 16, device, dtype), {}
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    encoder = PromptEncoder.of(pipe)
    data = batch(pipe, args.batch_size, resolution, llm.info.hidden_size)
    empty = EmptyPrompt(encoder([""]))
    results = []
    for kind in KINDS:
        config = TrainConfig.model_validate({"base": "x", "adapter": {"kind": kind, **shape},
                                             "loss": {"prompt_weight": 0.1}})
        for checkpointing in (True, False):
            prepare_frozen(pipe, torch.device(device), checkpointing)
            if not checkpointing:
                pipe.unet.disable_gradient_checkpointing()
            adapter = build_adapter(config, encoder.dim, llm.info.hidden_size, encoder.pooled_dim).to(device)
            optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-5)
            generator = torch.Generator(device=device).manual_seed(0)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            seconds = []
            for i in range(args.warmup + args.steps):
                t0 = time.perf_counter()
                with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                    terms = compute_losses(data, adapter, pipe, noise_scheduler, config.loss, generator,
                                           config.caption_dropout, empty if config.caption_dropout else None)
                terms["loss"].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    seconds.append(time.perf_counter() - t0)
            row = {"stack": stack, "kind": kind, "resolution": resolution, "checkpointing": checkpointing,
                   "batch_size": args.batch_size, **parameter_counts(adapter),
                   "s_per_step": sum(seconds) / len(seconds), "s_per_step_min": min(seconds),
                   "peak_gb": _peak(device)}
            if checkpointing:  # images: once per kind
                runtime = AdapterRuntime(adapter.eval(), llm if kind == "connector" else None)
                row.update(_images(pipe, runtime, resolution, args))
            results.append(row)
            print(json.dumps(row), flush=True)
            del adapter, optimizer
    base = _images(pipe, None, resolution, args)
    results.append({"stack": stack, "kind": "base", "resolution": resolution, **base})
    t0 = time.perf_counter()
    for _ in range(3):
        AdapterRuntime(torch.nn.Linear(1, 1), llm).llm_states(["a photograph of an astronaut riding a horse"], device)
    results.append({"stack": stack, "kind": "llm", "s_per_prompt": (time.perf_counter() - t0) / 3,
                    "llm": f"{llm.info.hidden_size} wide, {llm.info.num_layers} layers, random"})
    return results


def _images(pipe: Any, runtime: Any, resolution: int, args: argparse.Namespace) -> dict[str, float]:
    from adapter.inference import generate_images

    kwargs = dict(steps=args.image_steps, guidance_scale=5.0, height=resolution, width=resolution)
    generate_images(pipe, runtime, ["a red circle"], [0], **{**kwargs, "steps": 1})  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate_images(pipe, runtime, ["a red circle"], [0], **kwargs)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"s_per_image": time.perf_counter() - t0, "image_steps": args.image_steps}


def real_parameter_counts(llm_width: int) -> str:
    """Trainable parameters of every kind at real size (default settings), without building any UNet."""
    import warnings

    from adapter.config import TrainConfig
    from adapter.kinds import parameter_counts
    from adapter.train import build_adapter

    lines = [f"trainable parameters, default settings, LLM width {llm_width}", "",
             "| kind | SD 1.5 (D 768) | SDXL (D 2048, pooled 1280) |", "|---|---|---|"]
    for kind in KINDS:
        config = TrainConfig.model_validate({"base": "x", "adapter": {"kind": kind}})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            counts = [parameter_counts(build_adapter(config, dim, llm_width, pooled))["trainable"] / 1e6
                      for dim, pooled in ((768, None), (2048, 1280))]
        lines.append(f"| {kind} | {counts[0]:.1f}M | {counts[1]:.1f}M |")
    return "\n".join(lines) + "\n"


def markdown(results: list[dict[str, Any]], header: str) -> str:
    memory = "peak GPU GB" if any(r.get("device", "").startswith("cuda") for r in results) else "process peak RSS GB"
    lines = [header, "", f"| stack | kind | trainable params | grad ckpt | s/step | {memory} | s/image |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["kind"] == "llm":
            lines.append(f"| {r['stack']} | LLM pass (connector, once per prompt) | | | | | {r['s_per_prompt']:.3f} "
                         f"({r['llm']}) |")
        elif r["kind"] == "base":
            lines.append(f"| {r['stack']} | base (no adapter) | 0 | | | | {r['s_per_image']:.3f} |")
        else:
            image = f"{r['s_per_image']:.3f}" if "s_per_image" in r else ""
            lines.append(f"| {r['stack']} | {r['kind']} | {r['trainable'] / 1e6:.2f}M | "
                         f"{'on' if r['checkpointing'] else 'off'} | {r['s_per_step']:.3f} | {r['peak_gb']:.2f} | "
                         f"{image} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random models (a CPU dry run)")
    parser.add_argument("--stacks", default="sd15,sdxl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="frozen modules (default: bf16 on CUDA, fp32 on CPU); adapters train in fp32")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per kind and setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--work", default=str(ROOT / "bench-out" / "kinds"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--params", type=int, metavar="LLM_WIDTH", help="only print real-size parameter counts")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.params:
        print(real_parameter_counts(args.params))
        return
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print("RESULT " + json.dumps([{**r, "device": args.device} for r in run_stack(args.one, args)]), flush=True)
        return
    results = []
    for stack in args.stacks.split(","):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", stack], capture_output=True,
                              text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{stack} failed:\n{proc.stderr[-3000:]}")
        results += json.loads(lines[-1].removeprefix("RESULT "))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or
                                                                                platform.machine())
    header = (f"{args.device} ({name}), {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch "
              f"{torch.__version__}, frozen {args.dtype} / adapter fp32, batch {args.batch_size}, "
              f"{'tiny' if args.tiny else 'real-size'} random weights, {args.image_steps} denoising steps per image")
    table = markdown(results, header)
    print(table)
    if args.json:
        rows = [{"metric": f"s/step {r['stack']} {r['kind']} ckpt {'on' if r['checkpointing'] else 'off'}",
                 "ours": round(r["s_per_step"], 4), "unit": "s"} for r in results if "s_per_step" in r]
        write_rows(args.json, title="adapter kinds: training step, memory, images", workload=header, rows=rows,
                   results=results)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
