"""Every kind trains, resumes exactly, saves, loads and generates, on a tiny SD 1.5 and a tiny SDXL; the
diffusion term itself improves with training; CFG's unconditional branch is adapted or not as asked."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adapter.config import REFERENCE, TrainConfig
from adapter.inference import generate_images, load_adapter, load_pipeline
from adapter.kinds import ReproductionWarning
from adapter.train import train
from surd.demo.tiny import write_tiny_sdxl, write_tiny_world

DIM = 32
KINDS = ["sur", "paper", REFERENCE, "connector"]

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::adapter.kinds.ReproductionWarning")]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    world = write_tiny_world(tmp_path_factory.mktemp("kinds-train"), text_dim=DIM, n=8)
    world["sdxl"] = write_tiny_sdxl(world["root"] / "sdxl")
    return world


@pytest.fixture(scope="module")
def pipes(world) -> dict:
    return {"sd": load_pipeline(str(world["sd"])), "sdxl": load_pipeline(str(world["sdxl"]))}


def _config(world, base: str, kind: str, out: str, **overrides) -> TrainConfig:
    adapter = {"kind": kind, "ff_dim": 64, "heads": 4, "width": 32, "tokens": 4, "depth": 1}
    values = dict(data=str(world["run"]), base=str(world[base]), llm=str(world["llm"]), out=str(world["root"] / out),
                  resolution=32, batch_size=2, max_steps=4, checkpoint_every=2, validation_every=0,
                  tensorboard=False, caption_dropout=0.5, adapter=adapter)
    if kind != "connector":  # make the auxiliary terms count in a few steps
        values["loss"] = {"llm_weight": 0.1, "prompt_weight": 0.1}
    values.update(overrides)
    return TrainConfig.model_validate(values)


@pytest.mark.parametrize("base", ["sd", "sdxl"])
@pytest.mark.parametrize("kind", KINDS)
def test_kind_trains_resumes_exactly_saves_loads_and_generates(world, pipes, base: str, kind: str) -> None:
    ema = {"ema_decay": 0.9} if kind == "connector" else {}
    whole = train(_config(world, base, kind, f"{kind}-{base}-whole", **ema), progress=False)
    # Resume from the uninterrupted run's step-2 checkpoint in another folder: steps 3-4 must come out the same.
    checkpoint = whole / "checkpoints" / "checkpoint-0000002"
    resumed = train(_config(world, base, kind, f"{kind}-{base}-resumed", resume=str(checkpoint), **ema),
                    progress=False)
    a, b = load_file(str(whole / "adapter.safetensors")), load_file(str(resumed / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    if ema:  # the saved result is the average, not the last step's weights
        raw = load_file(str(whole / "checkpoints" / "checkpoint-0000004" / "model.safetensors"))
        assert (whole / "checkpoints" / "checkpoint-0000004" / "ema.safetensors").is_file()
        assert any(not torch.allclose(raw[k].float(), a[k]) for k in raw)
    saved = json.loads((whole / "adapter_config.json").read_text())
    assert saved["adapter"]["kind"] == kind and saved["steps"] == 4 and saved["caption_dropout"] == 0.5
    assert (saved["pooled_dim"] is not None) == (base == "sdxl")

    pipe = pipes[base]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = load_adapter(whole, pipe)
    assert adapter.kind == kind and not adapter.module.training
    assert any(issubclass(w.category, ReproductionWarning) for w in caught) == (kind == REFERENCE)
    prompts = ["a red circle", "a blue square"]
    images = generate_images(pipe, adapter, prompts, [1, 2], steps=2, guidance_scale=4.0)
    again = generate_images(pipe, adapter, prompts, [1, 2], steps=2, guidance_scale=4.0)
    base_images = generate_images(pipe, None, prompts, [1, 2], steps=2, guidance_scale=4.0)
    assert [im.size for im in images] == [(32, 32)] * 2
    assert np.array_equal(np.asarray(images[1]), np.asarray(again[1]))  # deterministic (dropout off, seeded)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(base_images[0]))  # the adapter is applied
    unadapted = generate_images(pipe, adapter, prompts, [1, 2], steps=2, guidance_scale=4.0,
                                adapt_unconditional=False)
    assert not np.array_equal(np.asarray(unadapted[0]), np.asarray(images[0]))  # the setting is honoured


def test_identity_at_init_reproduces_the_base_images_on_sdxl(world, pipes) -> None:
    from adapter.kinds import build

    pipe = pipes["sdxl"]
    config = _config(world, "sdxl", "sur", "unused")
    torch.manual_seed(0)
    identity = build(config.adapter, 64, None, pooled_dim=32)
    stock = pipe("a red circle", num_inference_steps=3, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(5)).images[0]
    # The stock SDXL pipeline zeroes an empty negative prompt: the unadapted branch must do the same.
    ours = generate_images(pipe, identity, ["a red circle"], [5], steps=3, guidance_scale=5.0,
                           adapt_unconditional=False)[0]
    assert np.array_equal(np.asarray(stock), np.asarray(ours))


def test_unadapted_unconditional_branch_is_the_stock_negative_embedding(pipes) -> None:
    from adapter.model import SURAdapter
    from adapter.text import PromptEncoder

    pipe = pipes["sd"]
    torch.manual_seed(0)
    adapter = SURAdapter(DIM, ff_dim=64, eta=1.0).eval()
    torch.nn.init.normal_(adapter.out.weight, std=1.0)
    ours = generate_images(pipe, adapter, ["a red circle"], [3], steps=2, guidance_scale=6.0,
                           adapt_unconditional=False)[0]
    encoder = PromptEncoder.of(pipe)
    with torch.no_grad():
        positive = adapter(encoder(["a red circle"]).hidden)
        manual = pipe(prompt_embeds=positive, negative_prompt_embeds=encoder([""]).hidden, num_inference_steps=2,
                      guidance_scale=6.0, generator=[torch.Generator().manual_seed(3)]).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(manual))


def test_training_improves_the_diffusion_term_itself(world, pipes) -> None:
    """Not the total (the auxiliary terms fall on their own): the diffusion MSE on fixed held-out draws."""
    from adapter.data import AdapterDataset, collate, read_samples, resolve_dataset
    from adapter.step import compute_losses, prepare_frozen
    from adapter.text import PromptEncoder
    from adapter.train import build_adapter

    config = _config(world, "sd", "sur", "improve", max_steps=40, checkpoint_every=0, learning_rate=3e-3,
                     caption_dropout=0.0, batch_size=4, adapter={"ff_dim": 64, "heads": 4, "depth": 1, "eta": 1.0})
    out = train(config, progress=False)
    pipe = prepare_frozen(pipes["sd"], torch.device("cpu"), checkpointing=False)
    trained = build_adapter(config, DIM, 32)
    trained.load_state_dict(load_file(str(out / "adapter.safetensors")))
    initial = build_adapter(config, DIM, 32)  # the same seed: the weights training started from
    samples = read_samples(resolve_dataset(world["run"]))
    dataset = AdapterDataset(samples, seed=0, resolution=32, center_crop=True, random_flip=False,
                             tokenizer=PromptEncoder.of(pipe), need_keyword=False, teacher_vectors=False)
    batch = collate([dataset[i] for i in range(len(samples))])
    no_aux = config.loss.model_copy(update={"llm_weight": 0.0, "prompt_weight": 0.0})

    def diffusion(adapter) -> float:
        adapter.eval()
        with torch.no_grad():
            return sum(compute_losses(batch, adapter, pipe, pipe.scheduler, no_aux,
                                      torch.Generator().manual_seed(1000 + k))["diffusion"].item() for k in range(8))

    before, after = diffusion(initial), diffusion(trained)
    assert after < 0.97 * before, (before, after)  # measured: 8.90 -> 8.06


@pytest.mark.parametrize("adapt_unconditional", [True, False])
def test_connector_runs_at_every_step_with_that_steps_timestep(world, pipes, adapt_unconditional: bool) -> None:
    from adapter.connector import Connector
    from adapter.inference import AdapterRuntime
    from adapter.teacher import load_teacher

    pipe = pipes["sdxl"]
    torch.manual_seed(0)
    connector = Connector(64, 32, tokens=4, width=32, depth=1, heads=4, ff_dim=64, pooled_dim=32).eval()
    seen = []
    handle = connector.register_forward_hook(lambda m, args, out: seen.append((args[2].tolist(), len(args[0]))))
    runtime = AdapterRuntime(connector, load_teacher(str(world["llm"])))
    try:
        generate_images(pipe, runtime, ["a red circle", "a blue square"], [1, 2], steps=3, guidance_scale=4.0,
                        adapt_unconditional=adapt_unconditional)
    finally:
        handle.remove()
    steps = pipe.scheduler.timesteps.tolist()
    rows = 4 if adapt_unconditional else 2  # [negatives; prompts], or the prompts alone
    assert [t for t, _ in seen] == [[s] * rows for s in steps] and {n for _, n in seen} == {rows}
    assert "forward" not in pipe.unet.__dict__  # the stock UNet's forward is back
