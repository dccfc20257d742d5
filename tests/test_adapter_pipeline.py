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

from adapter.inference import compare, generate, generate_images, labelled_grid, load_adapter, load_pipeline
from adapter.model import SURAdapter
from surd.cli.adapter import register, train_from_recipe
from surd.demo.tiny import write_tiny_dataset, write_tiny_sd, write_tiny_world
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
    (x0, y0), (x1, y1) = grid.info["cells"][(0, 0)], grid.info["cells"][(0, 1)]
    assert y1 == y0 and x1 >= x0 + base.width  # base | adapter side by side
    cell = np.asarray(grid)[y0 : y0 + base.height, x0 : x0 + base.width]
    assert np.array_equal(cell, np.asarray(base))  # same seed, left
    right = np.asarray(grid)[y1 : y1 + base.height, x1 : x1 + base.width]
    assert np.array_equal(right, np.asarray(adapted))


def test_adapter_for_another_text_width_is_refused(pipe, tmp_path) -> None:
    SURAdapter(64, ff_dim=64).save(tmp_path, {"base_model": "sd-other"})
    with pytest.raises(SurdError, match="64-dim"):
        load_adapter(tmp_path, pipe)


def _compare_size(prompt: str, kind: str, side: int = 32) -> tuple[int, int]:
    """The size of a `--compare` grid of two `side`-px images labelled with this prompt and arms."""
    blank = Image.new("RGB", (side, side))
    return labelled_grid([[blank, blank]], [prompt], ["base", f"adapter ({kind})"]).size


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
    # Resuming with another setting is another run: refused, naming it (this call once dropped the --set).
    result = runner.invoke(app, args[:-3] + ["--max-steps", "3", "--resume", "latest", "--quiet"])
    assert result.exit_code != 0 and "loss.prompt_loss kl -> cosine" in str(result.exception)
    result = runner.invoke(app, args + ["--max-steps", "3", "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "from checkpoint-0000002 (step 2)" in result.output
    assert json.loads((out / "adapter_config.json").read_text())["steps"] == 3

    png = tmp_path / "img" / "out.png"
    result = runner.invoke(app, ["generate", "a red circle", "--base", str(world["sd"]), "--adapter", str(out),
                                 "-o", str(png), "--compare", "--steps", "2", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert Image.open(png).size == _compare_size("a red circle", "sur")

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
    assert Image.open(out / "generate" / "000.png").size == _compare_size("a red circle", "sur")


def _ink(region: np.ndarray) -> int:
    """Dark pixels: text drawn on the white label bands."""
    return int((region.min(axis=-1) < 128).sum())


def test_compare_grid_labels_each_row_with_its_prompt_and_each_column_with_its_arm(pipe) -> None:
    torch.manual_seed(0)
    adapter = SURAdapter(DIM, ff_dim=64)
    prompts = ["a red circle", "a blue square on a white background"]
    grid = compare(pipe, adapter, prompts, seed=1, steps=1)
    pixels = np.asarray(grid)
    cells = grid.info["cells"]
    (x0, y0), (_, y1) = cells[(0, 0)], cells[(1, 0)]
    assert x0 > 0 and y0 > 0  # room for the prompt on the left and the arms on top
    assert _ink(pixels[:y0, x0:]) > 0  # column labels: base | adapter (sur)
    assert _ink(pixels[y0:y1, :x0]) > 0 and _ink(pixels[y1:, :x0]) > 0  # one prompt per row
    assert _ink(pixels[:y0, :x0]) == 0  # the corner stays empty
    # The labels are the prompts and the arms: other text draws other pixels, the images stay where they were.
    other = compare(pipe, adapter, ["a green triangle", prompts[1]], seed=1, steps=1)
    assert other.info["cells"] == cells
    assert not np.array_equal(np.asarray(other)[y0:y1, :x0], pixels[y0:y1, :x0])
    assert np.array_equal(np.asarray(other)[y1:, :], pixels[y1:, :])
    connector_label = labelled_grid([[grid, grid]], ["p"], ["base", "adapter (connector)"])
    sur_label = labelled_grid([[grid, grid]], ["p"], ["base", "adapter (sur)"])
    top = connector_label.info["cells"][(0, 0)][1]
    assert not np.array_equal(np.asarray(connector_label)[:top], np.asarray(sur_label)[:top])


def test_generate_images_reports_every_denoising_step(pipe) -> None:
    calls = []
    images = generate_images(pipe, None, ["a red circle", "a blue square"], [0, 1], steps=3,
                             on_step=lambda: calls.append(1))
    assert len(images) == 2 and len(calls) == 3  # one pipeline call for the batch: three steps
    calls.clear()
    compare(pipe, None, ["a red circle"], steps=2, on_step=lambda: calls.append(1))
    assert len(calls) == 4  # base and adapter, two steps each


@pytest.fixture(scope="module")
def single_file(world, tmp_path_factory) -> Path:
    from surd.demo.single_file import write_single_file

    return write_single_file(world["sd"], tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors")


def test_single_file_base_loads_offline_and_is_the_same_model(world, pipe, single_file, tmp_path) -> None:
    from safetensors.torch import load_file

    from adapter.base import base_fingerprint

    from_file = load_pipeline(str(single_file), config=str(world["sd"]))
    assert from_file.name_or_path == str(single_file)  # what a warning calls it (diffusers leaves it unset)
    ckpt = tmp_path / "tiny-sd15.ckpt"
    torch.save({"state_dict": load_file(str(single_file)), "global_step": 7}, ckpt)  # the usual .ckpt layout
    from_ckpt = load_pipeline(str(ckpt), config=str(world["sd"]))
    folder_image = np.asarray(generate(pipe, "a red circle", None, seed=3, steps=2))
    for other in (from_file, from_ckpt):
        assert np.array_equal(np.asarray(generate(other, "a red circle", None, seed=3, steps=2)), folder_image)
    # One model, one fingerprint: folder or single file, fp32 or bf16.
    fingerprints = {base_fingerprint(p) for p in (pipe, from_file, from_ckpt)}
    fingerprints.add(base_fingerprint(load_pipeline(str(single_file), config=str(world["sd"]), dtype=torch.bfloat16)))
    assert len(fingerprints) == 1
    another = load_pipeline(str(write_tiny_sd(tmp_path / "other", text_dim=DIM, seed=1)))
    assert base_fingerprint(another) not in fingerprints
    nudged = load_pipeline(str(world["sd"]))
    with torch.no_grad():  # a fine-tune moves weights across zero
        weight = nudged.unet.conv_in.weight
        weight.copy_(weight - weight.sign() * weight.abs().min(dim=0).values * 1.5)
    assert base_fingerprint(nudged) not in fingerprints


def test_single_file_errors_are_one_line_and_a_pickle_never_runs(world, tmp_path) -> None:
    with pytest.raises(SurdError, match="no such file"):
        load_pipeline(str(tmp_path / "missing.safetensors"))
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Payload()}, evil)
    with pytest.raises(SurdError, match="weights_only=True .*convert it to .safetensors"):
        load_pipeline(str(evil), config=str(world["sd"]))
    assert not marker.exists()


def test_single_file_without_its_configs_names_base_config(single_file) -> None:
    # Offline (HF_HUB_OFFLINE), diffusers cannot fetch the configs of the hub id it infers from the keys.
    with pytest.raises(SurdError, match="--base-config"):
        load_pipeline(str(single_file))


def test_cli_trains_on_a_single_file_and_generate_warns_on_another_base(world, single_file, tmp_path) -> None:
    from adapter.base import base_fingerprint

    runner = CliRunner()
    app = _cli()
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(world["run"]), "--base", str(single_file), "--base-config",
                                 str(world["sd"]), "--llm", str(world["llm"]), "--out", str(out), "--max-steps", "1",
                                 "--resolution", "32", "--batch-size", "2", "--validation-every", "0",
                                 "--report-to", "none", "--set", "adapter.ff_dim=64", "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["base_model"] == str(single_file) and saved["base_config"] == str(world["sd"])
    assert saved["base_fingerprint"] == base_fingerprint(load_pipeline(str(world["sd"])))

    def generate_with(base: str) -> str:
        result = runner.invoke(app, ["generate", "a red circle", "--base", base, "--adapter", str(out), "-o",
                                     str(tmp_path / "x.png"), "--steps", "1", "--quiet"])
        assert result.exit_code == 0, result.output
        return result.output

    assert "warning" not in generate_with(str(world["sd"]))  # the same weights as a folder: no warning
    other = write_tiny_sd(tmp_path / "other-sd", text_dim=DIM, seed=1)
    said = [line for line in generate_with(str(other)).splitlines() if "warning" in line]
    assert len(said) == 1 and f"--base {other} is not the model this adapter was trained on" in said[0]


def test_train_flags_people_look_for_show_defaults_and_reach_the_config(world, tmp_path) -> None:
    runner = CliRunner()
    app = _cli()
    text = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"}).output.split())
    for flag, default in (("--learning-rate", "0.0001"), ("--batch-size", "4"), ("--resolution", "512"),
                          ("--mixed-precision", "auto"), ("--gradient-accumulation", "1"),
                          ("--report-to", "tensorboard")):
        assert flag in text and f"[default: {default}]" in text.split(flag, 1)[1].split("│")[0], flag
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"train": {"batch_size": 3, "learning_rate": 0.5}}))
    out = tmp_path / "flags"
    result = runner.invoke(app, ["train", "--data", str(world["run"]), "--base", str(world["sd"]), "--llm",
                                 str(world["llm"]), "--out", str(out), "--max-steps", "1", "--config", str(config),
                                 "--learning-rate", "3e-4", "--resolution", "32", "--gradient-accumulation", "2",
                                 "--mixed-precision", "no", "--report-to", "none", "--validation-every", "0",
                                 "--set", "adapter.ff_dim=64", "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["learning_rate"] == 3e-4  # the flag wins over --config
    assert saved["batch_size"] == 3  # a flag left at its default does not override --config
    assert (saved["resolution"], saved["gradient_accumulation"], saved["mixed_precision"], saved["report_to"]) == \
        (32, 2, "no", "none")


def _adapter_trained_on(sd: Path, folder: Path) -> Path:
    """An adapter folder recording `sd` as its base, by path and by fingerprint (as `surd train` writes it)."""
    from adapter.base import base_fingerprint

    torch.manual_seed(0)
    SURAdapter(DIM, ff_dim=64).save(folder, {"base_model": str(sd),
                                             "base_fingerprint": base_fingerprint(load_pipeline(str(sd)))})
    return folder


def test_eval_warns_in_one_line_when_its_base_is_not_the_adapters(world, pipe, tmp_path, capsys) -> None:
    from adapter.config import EvalConfig
    from adapter.evaluate import run_eval
    from surd.demo.tiny import write_tiny_clip

    folder = _adapter_trained_on(world["sd"], tmp_path / "adapter")
    load_adapter(folder, pipe)  # its own base: nothing to say
    assert "warning" not in capsys.readouterr().err
    other = write_tiny_sd(tmp_path / "other-sd", text_dim=DIM, seed=1)
    config = EvalConfig(base=str(other), adapter=folder, clip=str(write_tiny_clip(tmp_path / "clip")),
                        probes=["counting"], limit=1, seeds=[0], steps=1, height=32, width=32)
    run_eval(config, tmp_path / "eval", progress=False)
    said = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(said) == 1 and f"--base {other} is not the model this adapter was trained on" in said[0]
    assert str(world["sd"]) in said[0]  # ... and names the one it was trained on
    said = []
    load_adapter(folder, load_pipeline(str(other)), warn=said.append)  # Python callers can take the line
    assert len(said) == 1 and "not the model this adapter was trained on" in said[0]


def test_recipe_with_a_single_file_base_trains_generates_and_evaluates(world, single_file, tmp_path,
                                                                       capsys) -> None:
    from adapter.recipe import ModelRecipe as Recipe
    from surd.demo.tiny import write_tiny_clip

    run = write_tiny_dataset(tmp_path / "run", n=6, test=1)
    spec = Recipe(collect=[], train={"base": str(single_file), "base_config": str(world["sd"]),
                                     "llm": str(world["llm"]), "resolution": 32, "batch_size": 2, "max_steps": 1,
                                     "validation_every": 0, "report_to": "none", "adapter": {"ff_dim": 64}},
                  generate={"prompts": ["a red circle"], "steps": 1},
                  eval={"clip": str(write_tiny_clip(tmp_path / "clip")), "probes": [], "seeds": [0], "steps": 1,
                        "height": 32, "width": 32})
    out = train_from_recipe(spec, run)
    assert Image.open(out / "generate" / "000.png").size == _compare_size("a red circle", "sur")
    results = json.loads((out / "eval" / "results.json").read_text())
    assert [a["name"] for a in results["arms"]] == ["base", "keyword", "adapter"]
    assert results["images"]["generated"] == 3 * results["prompts"]["surd"] > 0  # each arm, one seed
    assert "warning" not in capsys.readouterr().err  # the single file is the base it trained on
