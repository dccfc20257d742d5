"""Inference through a stock diffusers pipeline, and the `surd teacher/train/generate/adapter` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner

from adapter.inference import compare, generate, load_adapter, load_pipeline
from adapter.model import SURAdapter
from surd.cli.adapter import register, train_from_recipe
from surd.demo.tiny import write_tiny_dataset, write_tiny_world
from surd.errors import SurdError

DIM = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_world(tmp_path_factory.mktemp("adapter-cli"), text_dim=DIM, n=10)


@pytest.fixture(scope="module")
def pipe(world):
    return load_pipeline(str(world["sd"]))


def test_identity_adapter_reproduces_the_stock_pipeline_exactly(pipe) -> None:
    torch.manual_seed(0)
    identity = SURAdapter(DIM, ff_dim=64)  # residual mix at init
    stock = pipe("a red circle", num_inference_steps=3, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(5)).images[0]
    ours = generate(pipe, "a red circle", identity, seed=5, steps=3, guidance_scale=7.5)
    assert np.array_equal(np.asarray(stock), np.asarray(ours))  # routing through prompt_embeds changes nothing


def test_trained_adapter_changes_the_image_and_compare_is_side_by_side(pipe) -> None:
    torch.manual_seed(0)
    adapter = SURAdapter(DIM, ff_dim=64, eta=1.0)
    torch.nn.init.normal_(adapter.out.weight, std=1.0)
    base = generate(pipe, "a red circle", None, seed=1, steps=2)
    adapted = generate(pipe, "a red circle", adapter, seed=1, steps=2)
    assert not np.array_equal(np.asarray(base), np.asarray(adapted))
    grid = compare(pipe, adapter, ["a red circle", "a blue square"], seed=1, steps=2)
    assert grid.size == (2 * base.width, 2 * base.height)
    assert np.array_equal(np.asarray(grid)[: base.height, : base.width], np.asarray(base))  # same seed, left


def test_adapter_for_another_text_width_is_refused(pipe, tmp_path) -> None:
    SURAdapter(64, ff_dim=64).save(tmp_path, {"base_model": "sd-other"})
    with pytest.raises(SurdError, match="64-dim"):
        load_adapter(tmp_path, pipe)


def _cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_teacher_train_generate(world, tmp_path) -> None:
    runner = CliRunner()
    app = _cli()
    result = runner.invoke(app, ["teacher", str(world["run"]), "--llm", str(world["llm"]), "--layer", "-1"])
    assert result.exit_code == 0, result.output
    assert "10 computed" in result.output
    assert list((world["run"] / "cache" / "teacher").glob("*/part-*.safetensors"))

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"train": {"resolution": 32, "batch_size": 2, "validation_every": 0,
                                                "tensorboard": False, "adapter": {"ff_dim": 64}}}))
    out = tmp_path / "adapter-run"
    args = ["train", "--data", str(world["run"]), "--base", str(world["sd"]), "--llm", str(world["llm"]),
            "--layer", "-1", "--out", str(out), "--max-steps", "2", "--checkpoint-every", "1", "--seed", "3",
            "--config", str(config), "--set", "loss.prompt_loss=kl", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["seed"] == 3 and saved["loss"]["prompt_loss"] == "kl" and saved["batch_size"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-0000001", "checkpoint-0000002"]
    result = runner.invoke(app, args[:-3] + ["--max-steps", "3", "--resume", "latest", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter_config.json").read_text())["steps"] == 3

    png = tmp_path / "img" / "out.png"
    result = runner.invoke(app, ["generate", "a red circle", "--base", str(world["sd"]), "--adapter", str(out),
                                 "-o", str(png), "--compare", "--steps", "2", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert Image.open(png).size == (64, 32)

    result = runner.invoke(app, ["train", "--data", str(world["run"]), "--base", str(world["sd"]), "--out",
                                 str(tmp_path / "bad"), "--set", "adapter.depht=3"])
    assert result.exit_code != 0 and "adapter.depht" in str(result.exception)


def test_cli_convert_original(tmp_path) -> None:
    from test_adapter_model import _OriginalAdapter

    torch.save(_OriginalAdapter().state_dict(), tmp_path / "adapter_checkpoint5.pt")
    result = CliRunner().invoke(_cli(), ["adapter", "convert-original", str(tmp_path / "adapter_checkpoint5.pt"),
                                         "--out", str(tmp_path / "conv"), "--eta", "0.2"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert config["adapter"]["mix"] == "paper" and config["adapter"]["eta"] == 0.2
    assert config["adapter"]["kind"] == "paper"  # the original imports into the paper kind
    assert config["converted_from"].endswith("adapter_checkpoint5.pt")


def test_cli_trains_and_generates_a_connector(world, tmp_path) -> None:
    runner = CliRunner()
    app = _cli()
    out = tmp_path / "connector"
    sets = ["adapter.width=32", "adapter.heads=4", "adapter.tokens=4", "adapter.depth=1", "adapter.ff_dim=64",
            "resolution=32", "batch_size=2", "validation_every=0", "tensorboard=false"]
    args = ["train", "--kind", "connector", "--data", str(world["run"]), "--base", str(world["sd"]), "--llm",
            str(world["llm"]), "--out", str(out), "--max-steps", "2", "--quiet"]
    result = runner.invoke(app, args + [a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter_config.json").read_text())["adapter"]["kind"] == "connector"
    png = tmp_path / "connector.png"
    result = runner.invoke(app, ["generate", "a red circle", "--base", str(world["sd"]), "--adapter", str(out),
                                 "-o", str(png), "--steps", "2", "--stock-unconditional"])
    assert result.exit_code == 0, result.output
    assert Image.open(png).size == (32, 32)
    result = runner.invoke(app, args[:1] + ["--kind", "reference"] + args[3:])
    assert result.exit_code != 0 and "reference-with-defects" in str(result.exception)


def test_recipe_train_then_generate(world, tmp_path) -> None:
    from adapter.recipe import ModelRecipe as Recipe

    run = write_tiny_dataset(tmp_path / "run", n=6)
    spec = Recipe(collect=[], train={"base": str(world["sd"]), "llm": str(world["llm"]), "resolution": 32,
                                     "batch_size": 2, "max_steps": 2, "validation_every": 0, "tensorboard": False,
                                     "adapter": {"ff_dim": 64}},
                  generate={"prompts": ["a red circle"], "steps": 2})
    out = train_from_recipe(spec, run)
    assert out == run / "adapter" and (out / "adapter.safetensors").is_file()
    assert (run / "cache" / "latents").is_dir()  # caches beside the data, shared by later runs
    assert Image.open(out / "generate" / "000.png").size == (64, 32)
