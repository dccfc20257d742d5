"""`surd experiment shapes`: the whole chain, each step timed and cached.

    world      renders of seen combinations, imagefolder layout             EXP/world/images/
    llm        the packaged SmolLM2 (GGUF) saved once as a transformers folder EXP/models/llm/
    dataset    `surd run` of EXP/recipe.yaml (collect -> clean -> export)     EXP/run/surd/
    base       VAE + UNet on (image, keyword prompt) of the train split       EXP/models/base/
    judge      attribute classifier on fresh renders of every combination    EXP/models/judge/
    teacher    SmolLM2 vectors of the narrative prompts (`surd teacher`)     EXP/run/cache/
    adapter-K  `surd train` (adapter.train.train) for every adapter kind K   EXP/adapters/K/
    finetune   the base UNet trained on (image, narrative prompt)            EXP/models/finetune/
    eval       `surd eval` (adapter.evaluate.run_eval): every arm, same seeds EXP/eval/
    report     sanity checks first, then the tables                          EXP/report.html, report.md

A step's marker (`EXP/steps/<step>.json`, written last) holds a fingerprint of everything that decides its
output (its settings, the code of its module, the steps it reads); a rerun skips a step whose fingerprint
matches and redoes it, from a clean folder, when anything changed. `eval` resumes by itself (its images are
fingerprinted) and is always rerun: scoring is cheap.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapter.experiment import base_model, dataset, judge, prompts, world
from adapter.experiment.settings import TEACHER, TEACHER_LAYER, Settings, adapter_kinds, adapter_settings
from surd import layout
from surd.shards import atomic_write_json

Log = Callable[[str], None]


def _source(*modules: Any) -> str:
    """A digest of modules' source: changing the code of a step redoes it."""
    return hashlib.sha256("".join(inspect.getsource(m) for m in modules).encode()).hexdigest()[:16]


class Steps:
    """Runs named steps once per fingerprint; records wall time (and whether it came from the cache)."""

    def __init__(self, exp: Path, log: Log) -> None:
        self.folder, self.log = exp / "steps", log
        self.times: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, str] = {}

    def run(self, name: str, fingerprint: dict[str, Any], output: Path | None,
            work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.keys[name] = key
        marker = self.folder / f"{name}.json"
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("key") == key:
                self.times[name] = {"seconds": done["seconds"], "cached": True}
                self.log(f"{name}: cached ({done['seconds']:.0f}s when it ran)")
                return done["result"]
        if output is not None and output.exists():
            shutil.rmtree(output)  # a changed or interrupted step starts from nothing
        self.log(f"{name}: running")
        started = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - started
        atomic_write_json(marker, {"key": key, "seconds": seconds, "fingerprint": fingerprint, "result": result})
        self.times[name] = {"seconds": seconds, "cached": False}
        self.log(f"{name}: done in {seconds:.0f}s")
        return result

    def timed(self, name: str, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = work()
        self.times[name] = {"seconds": time.perf_counter() - started, "cached": False}
        return result


def _train_samples(run: Path) -> list[Any]:
    from adapter.data import read_samples, resolve_dataset

    return read_samples(resolve_dataset(run), "train")


def train_base(exp: Path, run: Path, settings: Settings, log: Log) -> dict[str, Any]:
    """VAE, then UNet on the keyword prompts of the dataset's train split; saved as a diffusers folder."""
    import torch

    samples = _train_samples(run)
    images = base_model.pixels([s.image for s in samples])
    vae = base_model.train_vae(images, base_model.Schedule(settings.vae_steps, batch_size=32, learning_rate=3e-3),
                               log=log)
    with torch.no_grad():
        sample = images[:256]
        error = float(((vae.decode(vae.encode(sample).latent_dist.mean).sample - sample) ** 2).mean())
    tokenizer = base_model.build_tokenizer()
    text_encoder = base_model.build_text_encoder(tokenizer)
    unet = base_model.train_unet(base_model.build_unet(), vae, tokenizer, text_encoder, images,
                                 [s.keyword for s in samples], base_model.Schedule(settings.base_steps, 32, 3e-3),
                                 high_noise=base_model.HIGH_NOISE, log=log)
    base_model.save_pipeline(exp / "models" / "base", vae, tokenizer, text_encoder, unet)
    return {"train_images": len(samples), "vae_reconstruction_mse": round(error, 5)}


def train_finetune(exp: Path, run: Path, settings: Settings, log: Log) -> dict[str, Any]:
    """The control: the base UNet trained further on (image, narrative prompt), VAE and text encoder unchanged."""
    from adapter.inference import load_pipeline

    samples = _train_samples(run)
    pipe = load_pipeline(str(exp / "models" / "base"))
    images = base_model.pixels([s.image for s in samples])
    unet = base_model.train_unet(pipe.unet, pipe.vae, pipe.tokenizer, pipe.text_encoder, images,
                                 [s.narrative for s in samples],
                                 base_model.Schedule(settings.finetune_steps, 32, 1e-3, seed=1),
                                 high_noise=base_model.HIGH_NOISE, log=log)
    base_model.save_pipeline(exp / "models" / "finetune", pipe.vae, pipe.tokenizer, pipe.text_encoder, unet)
    return {"train_images": len(samples)}


def train_and_check_judge(exp: Path, settings: Settings, log: Log) -> dict[str, Any]:
    """Train the judge on fresh renders of every combination (half of them through the world's VAE), then
    measure it on as many renders it never saw, and on those renders after a VAE round trip."""
    import random

    import torch

    from adapter.inference import load_pipeline

    def renders(n: int, seed: int) -> tuple[Any, list[dict[str, str]]]:
        rng = random.Random(seed)
        labels = list(world.cycle(world.combinations(), n, rng))
        return base_model.pixels([world.render(a, rng) for a in labels]), labels

    vae = load_pipeline(str(exp / "models" / "base")).vae

    @torch.no_grad()
    def round_trip(images: Any) -> Any:
        return torch.cat([vae.decode(vae.encode(images[i : i + 256]).latent_dist.mean).sample.clamp(-1, 1)
                          for i in range(0, len(images), 256)])

    images, labels = renders(settings.judge_renders, seed=101)
    half = len(images) // 2
    images = torch.cat([images[:half], round_trip(images[half:])])
    attributes = {name: list(values) for name, values in world.ATTRIBUTES.items()}
    net = judge.train_judge(images, labels, attributes, settings.judge_steps, log=log)
    check, check_labels = renders(settings.judge_renders, seed=202)
    held_out = [i for i, a in enumerate(check_labels) if world.is_held_out(a)]
    result = {
        "renders": judge.accuracy(net, check, check_labels),
        "held_out_combinations": judge.accuracy(net, check[held_out], [check_labels[i] for i in held_out]),
        "vae_round_trip": judge.accuracy(net, round_trip(check), check_labels),
        "checked_on": len(check_labels),
    }
    judge.save_judge(net, exp / "models" / "judge", {"trained_on": len(labels), "accuracy": result})
    return result


def convert_teacher(folder: Path) -> dict[str, Any]:
    """The packaged SmolLM2 (GGUF) saved as a transformers folder (safetensors), which every later step loads.

    transformers parses a GGUF file again for each config, tokenizer and weights it reads (about 11 s each on a
    core here, three or four per load), while the folder loads in about a second; the chain loads its teacher up
    to three times (teacher vectors, `surd train` if a vector is missing, the llm-expanded arm). The weights are
    GGUF's, de-quantised once; the folder must give the same last hidden state, or the step stops.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surd.errors import SurdError
    from surd.models import resolve_llm

    location = resolve_llm(TEACHER)
    tokenizer = AutoTokenizer.from_pretrained(location.path, gguf_file=location.gguf_file)
    gguf = AutoModelForCausalLM.from_pretrained(location.path, gguf_file=location.gguf_file, dtype=torch.float32)
    config = copy.deepcopy(gguf.config)
    if hasattr(config, "quantization_config"):  # the weights below are plain float32: nothing is quantised
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    check = tokenizer(["a crimson ball toward the west"], return_tensors="pt")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        want, got = (m.eval()(**check, output_hidden_states=True).hidden_states[-1] for m in (gguf, reloaded))
    if not torch.allclose(want, got, atol=1e-5):
        raise SurdError(f"{folder}: the saved teacher differs from {TEACHER} (max {float((want - got).abs().max())})")
    return {"from": TEACHER, "parameters": sum(p.numel() for p in plain.parameters())}


def build_teacher(exp: Path, run: Path, llm: str) -> dict[str, Any]:
    """The teacher vectors `surd train` needs, in the cache it reads, made by the toolkit's own function
    (`surd teacher`'s `build_teacher_cache`) over each *distinct* narrative once: a cache keyed by the text alone
    (`EXP/teacher/`, kept across reruns), copied to every sample that carries the text. With the per-token states
    too where the toolkit keeps them (the connector reads them, and the empty caption's for caption dropout), so
    no kind makes a second pass of the LLM."""
    from adapter.teacher import build_teacher_cache, describe_teacher, teacher_cache, tokens_key, vector_key

    samples = _train_samples(run)
    tokens = "keep_tokens" in inspect.signature(build_teacher_cache).parameters
    texts = sorted({s.narrative for s in samples} | ({""} if tokens else set()))
    text_id = {t: "" if t == "" else "text-" + hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts}
    extra: dict[str, Any] = {"keep_tokens": True} if tokens else {}
    by_text, computed = build_teacher_cache([(text_id[t], t) for t in texts], exp / "teacher", llm,
                                            TEACHER_LAYER, "mean", batch_size=64, **extra)
    per_sample = teacher_cache(layout.cache_dir(run), describe_teacher(llm), TEACHER_LAYER, "mean")
    keys = [vector_key] + ([tokens_key] if tokens else [])
    wanted = [(s.id, s.narrative) for s in samples] + ([("", "")] if tokens else [])
    entries = {key(i, t): by_text.get(key(text_id[t], t)).clone() for i, t in wanted for key in keys
               if key(i, t) not in per_sample}
    per_sample.add(entries)
    return {"texts": len(samples), "distinct": len(texts), "computed": computed, "tokens": tokens}


def train_adapter(exp: Path, run: Path, kind: str, settings: Settings, llm: str) -> dict[str, Any]:
    """One adapter kind, trained by the toolkit's own entry point on the exported shards."""
    from adapter.config import TrainConfig
    from adapter.train import train

    out = exp / "adapters" / kind
    config = TrainConfig(
        data=str(run), base=str(exp / "models" / "base"), llm=llm, layer=TEACHER_LAYER, out=str(out),
        resolution=world.SIDE, random_flip=False,  # a flip would swap left and right: position is an attribute here
        batch_size=settings.adapter_batch, max_steps=settings.adapter_steps,
        learning_rate=settings.adapter_learning_rate, mixed_precision="no", gradient_checkpointing=False,
        checkpoint_every=0, validation_every=0, tensorboard=False, teacher_batch_size=32,
        adapter=adapter_settings(kind),
    )
    train(config, progress=False)
    losses = (out / "logs" / "losses.csv").read_text().strip().splitlines()
    header, first, last = losses[0].split(","), losses[1].split(","), losses[-1].split(",")
    return {"config": json.loads(config.model_dump_json()),
            "first_step": dict(zip(header, first, strict=True)), "last_step": dict(zip(header, last, strict=True))}


def evaluate(exp: Path, settings: Settings, kinds: list[str], prompt_sets: dict[str, Path], llm: str,
             progress: bool) -> Any:
    """`surd eval` with the judge as scorer: floor, ceiling, every adapter, the fine-tune, the LLM expansion."""
    from adapter.config import EvalConfig
    from adapter.evaluate import run_eval

    config = EvalConfig(
        base=str(exp / "models" / "base"), adapters={kind: exp / "adapters" / kind for kind in kinds},
        scorer="attributes", judge=str(exp / "models" / "judge"), probes=[str(p) for p in prompt_sets.values()],
        seeds=list(range(settings.seeds)), steps=settings.inference_steps, guidance_scale=[settings.guidance],
        height=world.SIDE, width=world.SIDE, batch_size=64, device="cpu", llm=llm,
        finetune=str(exp / "models" / "finetune"),
    )
    return run_eval(config, exp / "eval", progress=progress)


def run_experiment(exp: Path, settings: Settings, progress: bool = True, log: Log = print) -> dict[str, Any]:
    """Every step of the chain into `exp` (cached where nothing changed); returns what the report reads."""
    from adapter import data, model, train

    exp = Path(exp)
    exp.mkdir(parents=True, exist_ok=True)
    steps = Steps(exp, log)
    run = exp / "run"
    images = exp / "world" / "images"
    steps.run("world", {"samples": settings.samples, "narratives": settings.narratives,
                        "code": _source(world, prompts, dataset)}, images.parent,
              lambda: {"images": dataset.write_images(images, settings.samples, seed=0,
                                                      narratives=settings.narratives)})
    llm = exp / "models" / "llm"
    steps.run("llm", {"from": TEACHER, "code": _source(convert_teacher)}, llm, lambda: convert_teacher(llm))
    splits = steps.run("dataset", {"world": steps.keys["world"], "recipe": dataset.RECIPE}, run,
                       lambda: {"splits": dataset.build_dataset(images, exp / "recipe.yaml", run, progress=False)})
    base = steps.run("base", {"dataset": steps.keys["dataset"], "vae": settings.vae_steps,
                              "unet": settings.base_steps, "code": _source(base_model)}, exp / "models" / "base",
                     lambda: train_base(exp, run, settings, log))
    judge_fingerprint = {"base": steps.keys["base"], "renders": settings.judge_renders, "steps": settings.judge_steps,
                         "code": _source(world, judge)}
    judged = steps.run("judge", judge_fingerprint, exp / "models" / "judge",
                       lambda: train_and_check_judge(exp, settings, log))
    prompt_sets = dataset.write_prompt_sets(exp / "prompts", settings.eval_prompts, seed=7)
    steps.run("teacher", {"dataset": steps.keys["dataset"], "llm": steps.keys["llm"], "layer": TEACHER_LAYER,
                         "code": _source(build_teacher)}, None,
              lambda: build_teacher(exp, run, str(llm)))
    kinds = adapter_kinds()
    adapters = {}
    for kind in kinds:
        fingerprint = {"base": steps.keys["base"], "kind": kind, "steps": settings.adapter_steps,
                       "batch": settings.adapter_batch, "lr": settings.adapter_learning_rate,
                       "adapter": adapter_settings(kind), "code": _source(model, train, data)}
        adapters[kind] = steps.run(f"adapter-{kind}", fingerprint, exp / "adapters" / kind,
                                   lambda kind=kind: train_adapter(exp, run, kind, settings, str(llm)))
    steps.run("finetune", {"base": steps.keys["base"], "steps": settings.finetune_steps, "code": _source(base_model)},
              exp / "models" / "finetune", lambda: train_finetune(exp, run, settings, log))
    results = steps.timed("eval", lambda: evaluate(exp, settings, kinds, prompt_sets, str(llm), progress))
    return {"settings": settings.as_dict(), "splits": splits, "base": base, "judge": judged, "kinds": kinds,
            "adapters": adapters, "times": steps.times, "eval": results}
