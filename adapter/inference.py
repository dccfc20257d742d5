"""Inference: stock diffusers pipelines (Stable Diffusion 1.x/2.x, SDXL) conditioned through an adapter of any kind.

Nothing is forked. Prompts are encoded exactly as training encoded them (adapter/text.py), then:
- `sur`, `paper`, `reference-with-defects`: the adapter runs once per prompt (eval mode, no_grad) and the result
  goes to the pipeline as `prompt_embeds` (SDXL: and `pooled_prompt_embeds`);
- `connector`: the LLM runs once per prompt; during the pipeline call the UNet's forward is wrapped so that the
  connector runs at every denoising step with that step's timestep (`connected`), then the stock UNet runs.
Classifier-free guidance: the negative (or empty) prompt goes through the adapter too when `adapt_unconditional`
(the adapter saw empty prompts in training, `train.caption_dropout`); otherwise it is what the stock pipeline
would use (SDXL's zeros for an empty negative prompt included).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from adapter.base import base_mismatch, load_pipeline
from adapter.kinds import LLMBatch, kind_of
from adapter.model import CONFIG_NAME
from adapter.text import PromptEncoder, TextBatch
from surd.errors import SurdError
from surd.models import precision_dtype, resolve_device, resolve_precision

__all__ = ["AdapterRuntime", "base_mismatch", "compare", "generate", "generate_images", "labelled_grid",
           "load_adapter", "load_pipeline"]


@dataclass
class AdapterRuntime:
    """A trained adapter ready for inference: the module, and for the connector the LLM that feeds it."""

    module: nn.Module
    teacher: Any = None  # adapter.teacher.Teacher (connector only)
    layer: int = -1

    @property
    def kind(self) -> str:
        return kind_of(self.module)

    def llm_states(self, prompts: Sequence[str], device: torch.device) -> LLMBatch:
        """The LLM's per-token states of `prompts` (content tokens), padded; the connector's input."""
        from adapter.data import pad_states
        from adapter.teacher import encode

        if self.teacher is None:
            raise SurdError("the connector needs its LLM at inference (load the adapter with load_adapter)")
        _, tokens = encode(self.teacher, list(prompts), self.layer, keep_tokens=True)
        states, mask = pad_states(tokens)
        return LLMBatch(None, states.to(device), mask.to(device))


def _runtime(adapter: Any) -> AdapterRuntime | None:
    return adapter if adapter is None or isinstance(adapter, AdapterRuntime) else AdapterRuntime(adapter)


@torch.no_grad()
def adapt_text(text: TextBatch, adapter: nn.Module) -> TextBatch:
    """A sur/paper/reference adapter applied to encoded prompts, in eval mode (dropout off)."""
    from adapter.losses import content_mask

    adapter.eval()  # identical calls must give identical embeddings
    param = next(adapter.parameters())
    pooled = None if text.pooled is None else text.pooled.to(param.device, param.dtype)
    parts = adapter(text.hidden.to(param.device, param.dtype), mask=content_mask(text.mask).to(param.device),
                    return_parts=True, pooled=pooled)
    out_pooled = None if text.pooled is None else parts.pooled.to(text.pooled.device, text.pooled.dtype)
    return TextBatch(parts.output.to(text.hidden.device, text.hidden.dtype), text.mask, out_pooled)


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: list[str], adapter: nn.Module | None = None) -> torch.Tensor:
    """Text encoder output [B, T, D] for `prompts`, through a sur/paper adapter (in eval mode) when one is given."""
    text = PromptEncoder.of(pipe)(prompts)
    return (text if adapter is None else adapt_text(text, adapter)).hidden


def _unconditional(pipe: Any, encoder: PromptEncoder, negative: Sequence[str], like: TextBatch) -> TextBatch:
    """What the stock pipeline uses for the negative prompt: SDXL zeros it when it is empty (force_zeros...)."""
    if encoder.sdxl and not any(negative) and pipe.config.get("force_zeros_for_empty_prompt", False):
        return TextBatch(torch.zeros_like(like.hidden), like.mask, torch.zeros_like(like.pooled))
    return encoder(list(negative))


@contextmanager
def connected(unet: nn.Module, connector: nn.Module, llm: LLMBatch, adapted: torch.Tensor) -> Iterator[None]:
    """Within the block, the UNet's rows where `adapted` [B] is True are conditioned by the connector at each
    call's timestep; the other rows keep the encoder_hidden_states the pipeline passes. Rows are in the order
    the pipeline stacks them (negative prompts first under guidance)."""
    original = unet.forward
    connector.eval()
    param = next(connector.parameters())

    def forward(sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args: Any,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> Any:
        rows = sample.shape[0]
        if rows != len(adapted):
            raise RuntimeError(f"connected UNet: {rows} rows, expected {len(adapted)}")
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(rows)
        groups = [(adapted.nonzero()[:, 0], True), ((~adapted).nonzero()[:, 0], False)]
        outputs = []
        for index, use_connector in groups:
            if len(index) == 0:
                continue
            hidden, added = encoder_hidden_states[index], _rows(added_cond_kwargs, index)
            if use_connector:
                pooled = None if added is None else added["text_embeds"].to(param.dtype)
                with torch.no_grad():
                    out = connector(llm.states[index], llm.mask[index], t[index], text=hidden.to(param.dtype),
                                    pooled=pooled)
                hidden = out.output.to(encoder_hidden_states.dtype)
                if added is not None and out.pooled is not None:
                    added = {**added, "text_embeds": out.pooled.to(added["text_embeds"].dtype)}
            result = original(sample[index], t[index], hidden, *args, added_cond_kwargs=added, **kwargs)
            outputs.append((index, result[0] if isinstance(result, tuple) else result.sample))
        merged = outputs[0][1].new_empty((rows, *outputs[0][1].shape[1:]))
        for index, out in outputs:
            merged[index] = out
        return (merged,) if kwargs.get("return_dict", True) is False else _unet_output(merged)

    had_own = "forward" in unet.__dict__  # e.g. accelerate's offload hooks wrap forward on the instance
    unet.forward = forward
    try:
        yield
    finally:
        if had_own:
            unet.forward = original
        else:
            del unet.forward  # the class's forward again


def _rows(added: dict[str, torch.Tensor] | None, index: torch.Tensor) -> dict[str, torch.Tensor] | None:
    return None if added is None else {k: v[index] for k, v in added.items()}


def _unet_output(sample: torch.Tensor) -> Any:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


@torch.no_grad()
def generate_images(pipe: Any, adapter: Any, prompts: Sequence[str], seeds: Sequence[int] | None = None, *,
                    generators: Sequence[torch.Generator] | None = None, steps: int = 30,
                    guidance_scale: float = 7.5, negative_prompt: str = "", height: int | None = None,
                    width: int | None = None, adapt_unconditional: bool = True,
                    on_step: Callable[[], None] | None = None) -> list[Image.Image]:
    """One image per prompt, for every kind and base (SD 1.x/2.x, SDXL). `adapter`: None (the base model), a
    module (sur/paper/reference) or an AdapterRuntime (any kind). Each image's noise comes from its own CPU
    generator seeded with its seed, so it does not depend on the batch it landed in. `on_step` is called after
    every denoising step (diffusers' `callback_on_step_end`), e.g. to move a progress bar."""
    runtime = _runtime(adapter)
    encoder = PromptEncoder.of(pipe)
    if generators is None:
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in (seeds or [0] * len(prompts))]
    cfg = guidance_scale > 1 and pipe.unet.config.get("time_cond_proj_dim") is None
    negatives = [negative_prompt] * len(prompts)
    text = encoder(list(prompts))
    uncond = None
    if cfg:
        adapted_uncond = runtime is not None and adapt_unconditional
        uncond = encoder(negatives) if adapted_uncond else _unconditional(pipe, encoder, negatives, text)
    call = dict(generator=list(generators), num_inference_steps=steps, guidance_scale=guidance_scale,
                height=height, width=width)
    if on_step is not None:
        call["callback_on_step_end"] = _step_callback(on_step)
    if runtime is not None and runtime.kind == "connector":
        # The pipeline stacks [negatives; prompts] under guidance; unadapted negative rows need no LLM states.
        rows = ([n if adapt_unconditional else "" for n in negatives] if cfg else []) + list(prompts)
        adapted = torch.tensor(([adapt_unconditional] * len(prompts) if cfg else []) + [True] * len(prompts))
        llm = runtime.llm_states(rows, next(runtime.module.parameters()).device)
        with connected(pipe.unet, runtime.module, llm, adapted.to(pipe.unet.device)):
            return pipe(**_embeds(text, uncond), **call).images
    if runtime is not None:
        text = adapt_text(text, runtime.module)
        if uncond is not None and adapt_unconditional:
            uncond = adapt_text(uncond, runtime.module)
    return pipe(**_embeds(text, uncond), **call).images


def _step_callback(on_step: Callable[[], None]) -> Callable[..., dict[str, Any]]:
    def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        on_step()
        return tensors  # diffusers reads the (unchanged) latents back from what the callback returns

    return callback


def _embeds(text: TextBatch, uncond: TextBatch | None) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_embeds": text.hidden, "negative_prompt_embeds": None if uncond is None else
                           uncond.hidden}
    if text.pooled is not None:
        out["pooled_prompt_embeds"] = text.pooled
        out["negative_pooled_prompt_embeds"] = None if uncond is None else uncond.pooled
    return out


def generate(pipe: Any, prompt: str, adapter: Any = None, *, seed: int = 0, steps: int = 30,
             guidance_scale: float = 7.5, negative_prompt: str = "", height: int | None = None,
             width: int | None = None, adapt_unconditional: bool = True,
             on_step: Callable[[], None] | None = None) -> Image.Image:
    """One image; the same seed gives the same starting noise with and without the adapter."""
    return generate_images(pipe, adapter, [prompt], [seed], steps=steps, guidance_scale=guidance_scale,
                           negative_prompt=negative_prompt, height=height, width=width,
                           adapt_unconditional=adapt_unconditional, on_step=on_step)[0]


def _wrap(text: str, font: Any, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        trial = f"{lines[-1]} {word}".strip()
        if font.getlength(trial) <= width or not lines[-1]:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines


def labelled_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str],
                  column_labels: Sequence[str]) -> Image.Image:
    """Images in rows and columns at the first image's size, each row labelled on its left (e.g. its prompt) and
    each column on top (e.g. `base` | `adapter (sur)`), in PIL's default font. `grid.info["cells"][(row, column)]`
    is where that image's top-left corner went."""
    from PIL import ImageDraw, ImageFont

    w, h = rows[0][0].size
    size = max(11, min(w, h) // 24)  # readable beside 32 px test images and 1024 px SDXL images alike
    font = ImageFont.load_default(size=size)
    line, pad = round(size * 1.25), max(4, size // 2)
    label_width = max(w, 14 * size)
    # A column is as wide as its image or its label, whichever is wider (a 32 px image under `adapter (sur)`).
    column = max([w] + [round(font.getlength(label)) + 2 * pad for label in column_labels])
    top = line + 2 * pad if column_labels else 0
    wrapped = [_wrap(label, font, label_width - 2 * pad) for label in row_labels]
    heights = [max(h, line * len(lines) + 2 * pad) + pad for lines in wrapped]
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_width + column * columns, top + sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    for x, label in enumerate(column_labels):
        draw.text((label_width + x * column + pad, pad), label, fill="black", font=font)
    cells, y = {}, top
    for r, (row, lines, height) in enumerate(zip(rows, wrapped, heights, strict=True)):
        for n, text in enumerate(lines):
            draw.text((pad, y + pad + n * line), text, fill="black", font=font)
        for x, image in enumerate(row):
            cells[(r, x)] = (label_width + x * column, y)
            grid.paste(image.convert("RGB"), cells[(r, x)])
        y += height
    grid.info["cells"] = cells
    return grid


def arm_label(adapter: Any) -> str:
    """What a grid's column calls an adapter: `adapter (<kind>)`."""
    runtime = _runtime(adapter)
    return "base" if runtime is None else f"adapter ({runtime.kind})"


def compare(pipe: Any, adapter: Any, prompts: list[str], seed: int = 0, on_step: Callable[[], None] | None = None,
            **kwargs: Any) -> Image.Image:
    """Base and adapter images for each prompt, same seed, in a grid labelled with the prompts and the arms."""
    rows = [[generate(pipe, p, None, seed=seed, on_step=on_step, **kwargs),
             generate(pipe, p, adapter, seed=seed, on_step=on_step, **kwargs)] for p in prompts]
    return labelled_grid(rows, prompts, ["base", arm_label(adapter)])


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # sys.stderr looked up now: whatever stderr is at the time


def load_adapter(run_dir: Path, pipe: Any, llm: str | None = None,
                 warn: Callable[[str], None] | None = _to_stderr) -> AdapterRuntime:
    """A trained adapter of any kind, checked against the pipeline's text width and moved to its device; for the
    connector, its LLM too (`llm` overrides the one recorded at training). `warn` hears one line when `pipe` is
    not the base the adapter was trained on (generate, eval and Python callers alike; None: not checked)."""
    from adapter.kinds import load

    module = load(run_dir)
    dim = PromptEncoder.of(pipe).dim
    saved = json.loads((Path(run_dir) / CONFIG_NAME).read_text())
    if module.dim != dim:
        raise SurdError(f"--adapter {run_dir}: trained for a {module.dim}-dim text encoder "
                        f"({saved.get('base_model', '?')}), but --base has {dim}")
    name = getattr(pipe, "name_or_path", None) or "(this pipeline)"
    mismatch = None if warn is None else base_mismatch(pipe, run_dir, name)
    if mismatch:
        warn(mismatch)
    module = module.to(pipe.device)
    if kind_of(module) != "connector":
        return AdapterRuntime(module)
    from adapter.teacher import DTYPES, load_teacher

    info = saved.get("teacher") or {}
    spec = llm or info.get("model")
    if not spec:
        raise SurdError(f"--adapter {run_dir}: a connector, but no LLM recorded: pass --llm")
    teacher = load_teacher(spec, device=pipe.device, dtype=DTYPES[info.get("dtype", "fp32")])
    if int(teacher.info.hidden_size) != module.config["llm_dim"]:
        raise SurdError(f"--llm {spec}: hidden size {teacher.info.hidden_size}, the connector was trained on "
                        f"{module.config['llm_dim']}")
    return AdapterRuntime(module, teacher, int(info.get("layer", -1)))


def generate_to_file(base: str, adapter_dir: Path, prompt: str, out: Path, *, seed: int = 0, side: bool = False,
                     steps: int = 30, guidance_scale: float = 7.5, negative_prompt: str = "",
                     device: str | None = None, adapt_unconditional: bool = True, llm: str | None = None,
                     base_config: str | None = None, progress: bool = False,
                     warn: Callable[[str], None] | None = None) -> Path:
    """`surd generate`: write the adapter image (or the labelled base | adapter grid) to `out`; `warn` hears
    one line when `base` is not the model the adapter was trained on."""
    from pipelines.progress import progress_bar

    device = resolve_device(device)
    pipe = load_pipeline(base, device=device, dtype=precision_dtype(resolve_precision("auto", device)),
                         config=base_config)
    adapter = load_adapter(adapter_dir, pipe, llm, warn=warn or _to_stderr)
    kwargs = dict(seed=seed, steps=steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                  adapt_unconditional=adapt_unconditional)
    with progress_bar("generate", steps * (2 if side else 1), enabled=progress, unit="steps") as bar:
        step = lambda: bar.advance(1)  # noqa: E731
        image = (compare(pipe, adapter, [prompt], on_step=step, **kwargs) if side
                 else generate(pipe, prompt, adapter, on_step=step, **kwargs))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
