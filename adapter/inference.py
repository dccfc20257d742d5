"""Inference: a standard diffusers StableDiffusionPipeline with prompt encoding routed through the adapter.

The pipeline is not forked: we encode the prompt (and the negative prompt) exactly as training did,
pass the text encoder output through the adapter in eval mode under no_grad, and hand the result to
the pipeline as `prompt_embeds` / `negative_prompt_embeds`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from adapter.data import text_embeds, tokenize
from adapter.model import CONFIG_NAME, SURAdapter
from surd.errors import SurdError
from surd.models import resolve_device


def load_pipeline(base: str, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """Any diffusers Stable Diffusion folder or hub id, safety checker off, progress bars off."""
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            base, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as e:
        raise SurdError(f"--base {base!r}: cannot load a Stable Diffusion pipeline: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: list[str], adapter: SURAdapter | None = None) -> torch.Tensor:
    """Text encoder output [B, T, D] for `prompts`, through the adapter (in eval mode) when one is given."""
    ids, mask = tokenize(pipe.tokenizer, prompts)
    embeds = text_embeds(pipe.text_encoder, ids, mask)
    if adapter is None:
        return embeds
    adapter.eval()  # dropout off: identical calls must give identical embeddings
    param = next(adapter.parameters())
    return adapter(embeds.to(param.device, param.dtype)).to(embeds.device, embeds.dtype)


def generate(pipe: Any, prompt: str, adapter: SURAdapter | None = None, *, seed: int = 0, steps: int = 30,
             guidance_scale: float = 7.5, negative_prompt: str = "", height: int | None = None,
             width: int | None = None) -> Image.Image:
    """One image; the same seed gives the same starting noise with and without the adapter."""
    prompt_embeds = encode_prompts(pipe, [prompt], adapter)
    negative = encode_prompts(pipe, [negative_prompt], adapter) if guidance_scale > 1 else None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, generator=generator,
                num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width).images[0]


def side_by_side(rows: list[list[Image.Image]]) -> Image.Image:
    """A grid: one row per prompt, columns as given (e.g. base | adapter)."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.convert("RGB"), (x * w, y * h))
    return grid


def compare(pipe: Any, adapter: SURAdapter, prompts: list[str], seed: int = 0, **kwargs: Any) -> Image.Image:
    """Base and adapter images for each prompt, same seed, side by side."""
    rows = [[generate(pipe, p, None, seed=seed, **kwargs), generate(pipe, p, adapter, seed=seed, **kwargs)]
            for p in prompts]
    return side_by_side(rows)


def load_adapter(run_dir: Path, pipe: Any) -> SURAdapter:
    """A trained adapter, checked against the pipeline's text encoder width and moved to its device."""
    adapter = SURAdapter.load(run_dir)
    dim = int(pipe.text_encoder.config.hidden_size)
    if adapter.dim != dim:
        base = json.loads((Path(run_dir) / CONFIG_NAME).read_text()).get("base_model", "?")
        raise SurdError(f"--adapter {run_dir}: trained for a {adapter.dim}-dim text encoder ({base}), "
                        f"but --base has {dim}")
    return adapter.to(pipe.device)


def generate_to_file(base: str, adapter_dir: Path, prompt: str, out: Path, *, seed: int = 0, side: bool = False,
                     steps: int = 30, guidance_scale: float = 7.5, negative_prompt: str = "",
                     device: str | None = None) -> Path:
    """`surd generate`: write the adapter image (or base | adapter side by side) to `out`."""
    device = resolve_device(device)
    pipe = load_pipeline(base, device=device, dtype=torch.float16 if device.startswith("cuda") else torch.float32)
    adapter = load_adapter(adapter_dir, pipe)
    kwargs = dict(seed=seed, steps=steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt)
    image = compare(pipe, adapter, [prompt], **kwargs) if side else generate(pipe, prompt, adapter, **kwargs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
