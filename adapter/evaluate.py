"""`surd eval`: adapters against the base model (and controls) on the same prompts and seeds.

Prompt sets: SURD's `test` split narrative prompts, the shipped probe sets (`adapter/probes/`) and prompt-set
YAML files of the same layout. Arms: `base` (the base model on the narrative prompt: the floor), `keyword` (the
base model on the keyword prompt, for prompts that have one: the ceiling), one arm per adapter (the same model
with prompt encoding through it), and the optional controls `llm-expanded` (the base model on an LLM's
expansion of the narrative prompt) and `finetune` (another diffusers model, e.g. a plain fine-tune on the same
data). Every arm draws its starting noise from the same per-image CPU generator seeded with the image's seed;
with several guidance scales every arm is generated at each.

Images live in `OUT/images/<arm>-<fingerprint>/<prompt hash>-s<seed>.png`; the fingerprint covers the model,
the adapter weights and the sampler settings, so a rerun reuses exactly the images it can and nothing
stale. Scoring (`adapter/eval_scores.py`, a pluggable scorer) and the reports (`adapter/eval_report.py`) run
on what is on disk.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from adapter.config import EvalConfig
from adapter.probes import load_probes
from surd import layout
from surd.errors import SurdError
from surd.models import resolve_device
from surd.shards import atomic_write_bytes

IMAGES = "images"


@dataclass(frozen=True)
class EvalItem:
    """One prompt to evaluate: a SURD test row or a probe."""

    id: str
    category: str  # `surd` or the probe set's category
    prompt: str  # the narrative prompt every arm is scored against
    keyword_prompt: str | None = None
    alternatives: tuple[str, ...] = ()
    answer: int | None = None
    attributes: tuple[tuple[str, str], ...] = ()  # the prompt's true attributes, for an attribute scorer


NARRATIVE, KEYWORD, EXPANSION = "narrative", "keyword", "llm expansion"  # what an arm generates from
RESERVED_ARMS = ("base", "keyword", "llm-expanded", "finetune")


@dataclass(frozen=True)
class Arm:
    name: str
    model: str
    adapter: Path | None
    prompts: str  # NARRATIVE, KEYWORD or EXPANSION
    guidance: float
    tag: str  # name + fingerprint: the image folder


@dataclass(frozen=True)
class Job:
    arm: Arm
    item: EvalItem
    seed: int
    generation_prompt: str
    path: Path


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- prompt sets


def surd_test_items(data: Path, limit: int | None) -> tuple[list[EvalItem], int]:
    """SURD `test` rows with a narrative prompt, sorted by id; also how many test rows had none."""
    dataset = layout.find_dataset(data)
    if dataset is None:
        raise SurdError(f"--data {data}: no exported dataset (expected {layout.dataset_data_dir(data)}/*.parquet)")
    files = sorted((dataset / "data").glob("*.parquet"))
    columns = ["id", "narrative_prompt", "keyword_prompt", "split"]
    try:
        tables = [pq.read_table(f, columns=columns) for f in files]
    except (OSError, KeyError, ValueError) as e:
        raise SurdError(f"--data {data}: cannot read the SURD shards ({e})") from None
    rows: list[dict[str, Any]] = []
    for table in tables:
        rows.extend(table.filter(pc.equal(table.column("split"), "test")).to_pylist())
    if not rows:
        raise SurdError(f"--data {data}: the dataset has no `test` split rows to evaluate on")
    usable = sorted((r for r in rows if (r["narrative_prompt"] or "").strip()), key=lambda r: r["id"])
    items = [EvalItem(r["id"], "surd", r["narrative_prompt"].strip(), (r["keyword_prompt"] or "").strip() or None)
             for r in usable]
    return items[:limit] if limit else items, len(rows) - len(usable)


def probe_items(names: list[str], limit: int | None) -> list[EvalItem]:
    by_category: dict[str, list[EvalItem]] = defaultdict(list)
    for p in load_probes(names):
        by_category[p.category].append(EvalItem(p.id, p.category, p.prompt, p.keyword_prompt, p.alternatives,
                                                p.answer, p.attributes))
    return [item for items in by_category.values() for item in (items[:limit] if limit else items)]


# ---------------------------------------------------------------- arms and images


def _settings(config: EvalConfig, guidance: float) -> dict[str, Any]:
    return {"steps": config.steps, "guidance_scale": guidance, "negative_prompt": config.negative_prompt,
            "height": config.height, "width": config.width,
            "adapt_unconditional": config.adapt_unconditional}


def _model_identity(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def adapter_arms(config: EvalConfig) -> dict[str, Path]:
    """Adapter arm name -> run folder, each checked to hold a finished adapter."""
    from adapter.model import CONFIG_NAME, WEIGHTS_NAME

    named = ({"adapter": config.adapter} if config.adapter is not None else {}) | dict(config.adapters)
    for name, folder in named.items():
        if name in RESERVED_ARMS or not name.strip():
            raise SurdError(f"--adapter {name}={folder}: {name!r} is the name of another arm; pick another")
        if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
            raise SurdError(f"--adapter {folder}: no {WEIGHTS_NAME} + {CONFIG_NAME} (a finished `surd train` run?)")
    return named


def build_arms(config: EvalConfig) -> list[Arm]:
    """The arms to generate (each at every guidance scale), tagged with a fingerprint of what decides the pixels."""
    from adapter.model import WEIGHTS_NAME

    specs: list[tuple[str, str, Path | None, str]] = [("base", config.base, None, NARRATIVE)]
    if config.keyword:
        specs.append(("keyword", config.base, None, KEYWORD))
    specs += [(name, config.base, folder, NARRATIVE) for name, folder in adapter_arms(config).items()]
    if config.llm:
        specs.append(("llm-expanded", config.base, None, EXPANSION))
    if config.finetune:
        specs.append(("finetune", config.finetune, None, NARRATIVE))
    arms = []
    for guidance in config.guidance_scale:
        for name, model, adapter, prompts in specs:
            identity = {"model": _model_identity(model), "settings": _settings(config, guidance),
                        "adapter": _file_digest(adapter / WEIGHTS_NAME) if adapter else None}
            digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
            arms.append(Arm(name, model, adapter, prompts, guidance, f"{name}-{digest}"))
    return arms


def _generation_prompt(arm: Arm, item: EvalItem, expansions: dict[str, str]) -> str | None:
    if arm.prompts == KEYWORD:
        return item.keyword_prompt
    return expansions.get(item.prompt) if arm.prompts == EXPANSION else item.prompt


def plan_jobs(arms: list[Arm], items: list[EvalItem], seeds: list[int], out: Path,
              expansions: dict[str, str]) -> list[Job]:
    """Every (arm, prompt, seed) image, keyed by arm tag, prompt hash and seed."""
    jobs = []
    for arm in arms:
        for item in items:
            prompt = _generation_prompt(arm, item, expansions)
            if prompt is None:  # no keyword prompt, or the LLM failed on this prompt: no image for this arm
                continue
            for seed in seeds:
                path = out / IMAGES / arm.tag / f"{prompt_hash(prompt)}-s{seed}.png"
                jobs.append(Job(arm, item, seed, prompt, path))
    return jobs


def _generate_batch(pipe: Any, adapter: Any, prompts: list[str], seeds: list[int], config: EvalConfig,
                    guidance: float, on_step: Any = None) -> list[Any]:
    from adapter.inference import generate_images

    # Every kind and base (SD, SDXL) goes through the one generation function `surd generate` uses.
    return generate_images(pipe, adapter, prompts, seeds, steps=config.steps, guidance_scale=guidance,
                           negative_prompt=config.negative_prompt, height=config.height, width=config.width,
                           adapt_unconditional=config.adapt_unconditional, on_step=on_step)


def generate_missing(jobs: list[Job], config: EvalConfig, bar: Any) -> int:
    """Generate the images not on disk yet (one pipeline per model), advancing `bar` by each image's denoising
    steps as they happen; returns how many were made."""
    import torch

    from adapter.inference import load_adapter, load_pipeline

    todo = list({j.path: j for j in jobs if not j.path.is_file()}.values())  # rows sharing a prompt share images
    by_model: dict[str, list[Job]] = defaultdict(list)
    for job in todo:
        by_model[job.arm.model].append(job)
    device = resolve_device(config.device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    for model, model_jobs in by_model.items():
        configs = config.base_config if model == config.base else None  # a single-file --base's (not --finetune's)
        pipe = load_pipeline(model, device=device, dtype=dtype, config=configs)
        adapters = {folder: load_adapter(folder, pipe) for folder in {j.arm.adapter for j in model_jobs} if folder}
        by_arm: dict[Arm, list[Job]] = defaultdict(list)
        for job in model_jobs:
            by_arm[job.arm].append(job)
        for arm, arm_jobs in by_arm.items():
            adapter = adapters.get(arm.adapter) if arm.adapter else None
            for start in range(0, len(arm_jobs), config.batch_size):
                chunk = arm_jobs[start : start + config.batch_size]
                images = _generate_batch(pipe, adapter, [j.generation_prompt for j in chunk],
                                         [j.seed for j in chunk], config, arm.guidance,
                                         lambda n=len(chunk): bar.advance(n))
                for job, image in zip(chunk, images, strict=True):
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    atomic_write_bytes(job.path, buffer.getvalue())  # a killed run never leaves half an image
        del pipe, adapters
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # before the next model (a --finetune control) loads
    return len(todo)


def write_arm_cards(arms: list[Arm], config: EvalConfig, out: Path) -> None:
    """`images/<tag>/arm.json`: what produced the images in that folder."""
    from surd.shards import atomic_write_json

    for arm in arms:
        card = {"arm": arm.name, "model": arm.model, "adapter": str(arm.adapter) if arm.adapter else None,
                "prompts": f"{arm.prompts} prompt", "llm": config.llm if arm.prompts == EXPANSION else None,
                **_settings(config, arm.guidance)}
        atomic_write_json(out / IMAGES / arm.tag / "arm.json", card)


# ---------------------------------------------------------------- the llm-expanded control

EXPAND_TEMPLATE = Path(__file__).parent / "templates" / "expand-v1.yaml"


def expand_prompts(config: EvalConfig, prompts: list[str], out: Path) -> dict[str, str]:
    """LLM expansions of `prompts` (greedy, cached in OUT/llm-cache.sqlite); prompts that failed are left out."""
    from surd.llm import LLMError, RequestCache, Sampling, TransformersLLM, cache_key, load_template
    from surd.llm_openai import OpenAILLM

    assert config.llm is not None
    template = load_template(str(EXPAND_TEMPLATE))
    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=96, seed=0)
    cache = RequestCache(out / "llm-cache.sqlite")
    unique = list(dict.fromkeys(prompts))
    keys = {p: cache_key(kind="expand", template=template.id, digest=template.digest, model=config.llm,
                         url=config.llm_url, prompt=p, sampling=sampling.as_dict()) for p in unique}
    found = cache.get_many(list(keys.values()))
    todo = [p for p in unique if keys[p] not in found]
    if todo:
        llm: Any = OpenAILLM(config.llm, config.llm_url) if config.llm_url else TransformersLLM(config.llm)
        results = llm.generate([template.messages({"narrative_prompt": p}) for p in todo], 1, sampling)
        new = {}
        for prompt, result in zip(todo, results, strict=True):
            text = "" if isinstance(result, LLMError) else _one_line(result[0])
            if text:
                new[keys[prompt]] = [text]
        cache.put_many(new)
        found.update(new)
    return {p: found[keys[p]][0] for p in unique if keys[p] in found}


def _one_line(text: str) -> str:
    line = next((s.strip() for s in text.strip().splitlines() if s.strip()), "")
    return line.strip("\"'` ")


# ---------------------------------------------------------------- the whole evaluation


def _bar(total: int, label: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="img", disable=not enabled or total == 0)


def _record(job: Job) -> dict[str, Any]:
    item = job.item
    return {"arm": job.arm.name, "arm_tag": job.arm.tag, "guidance": job.arm.guidance, "category": item.category,
            "item_id": item.id, "seed": job.seed, "prompt": item.prompt, "keyword_prompt": item.keyword_prompt,
            "generation_prompt": job.generation_prompt, "alternatives": list(item.alternatives),
            "answer": item.answer, "attributes": json.dumps(dict(item.attributes)) if item.attributes else None,
            "path": str(job.path)}


def run_eval(config: EvalConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Generate what is missing, score everything, write results.json / results.md / report.html / scores.parquet."""
    import pyarrow as pa

    from adapter.eval_report import summarise, write_reports
    from adapter.eval_scores import load_scorer
    from pipelines.progress import progress_bar
    from surd.shards import atomic_write_json, write_table

    out = Path(out)
    items: list[EvalItem] = []
    skipped = 0
    if config.data is not None:
        items, skipped = surd_test_items(config.data, config.limit)
    items += probe_items(config.probes, config.limit)
    if not items:
        raise SurdError("nothing to evaluate: give --data (a run with an exported dataset) and/or --probes")
    arms = build_arms(config)
    scorer = load_scorer(config, device=resolve_device(config.device))  # a bad scorer stops us before generating
    out.mkdir(parents=True, exist_ok=True)
    expansions = expand_prompts(config, [i.prompt for i in items], out) if config.llm else {}
    jobs = plan_jobs(arms, items, config.seeds, out, expansions)
    write_arm_cards(arms, config, out)
    missing = len({j.path for j in jobs if not j.path.is_file()})
    with progress_bar("eval: generate", missing * config.steps, enabled=progress and missing > 0,
                      unit="steps") as bar:  # denoising steps: a batch of 4 at 30 steps moves 30 times
        generated = generate_missing(jobs, config, bar)

    with _bar(len(jobs), "score", progress) as bar:
        scored = scorer.score([_record(j) for j in jobs], bar)
    for record in scored:
        record["image"] = str(Path(record.pop("path")).relative_to(out))
    write_table(out / "scores.parquet", pa.Table.from_pylist(scored))

    used = {j.arm for j in jobs}  # e.g. no keyword arm when no prompt has a keyword prompt
    arm_names = list(dict.fromkeys(a.name for a in arms if a in used))
    results = {
        "config": json.loads(config.model_dump_json()),
        "scorer": {"name": config.scorer, "label": scorer.label, "primary": scorer.primary,
                   "metrics": [m.as_dict() for m in scorer.metrics]},
        "arms": [{"name": a.name, "tag": a.tag, "guidance": a.guidance, "model": a.model,
                  "adapter": str(a.adapter) if a.adapter else None, "prompts": a.prompts}
                 for a in arms if a in used],  # a list: keeps the order
        "images": {"total": len(jobs), "generated": generated, "reused": len(jobs) - generated},
        "prompts": {"surd": sum(i.category == "surd" for i in items),
                    "probes": sum(i.category != "surd" for i in items),
                    "surd_test_rows_without_narrative": skipped,
                    "llm_expansion_failures": len({i.prompt for i in items} - set(expansions)) if config.llm else 0},
        "categories": summarise(scored, arm_names, scorer.metrics, scorer.primary),
    }
    atomic_write_json(out / "results.json", results)
    write_reports(results, scored, out)
    return results
