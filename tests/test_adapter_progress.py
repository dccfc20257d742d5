"""Denoising shows progress: `surd generate` and each validation grid advance a bar per denoising step (without a
terminal: plain `[surd]` lines), and validation grids are labelled with their prompts and arms."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from adapter.config import TrainConfig
from adapter.inference import labelled_grid
from adapter.train import train
from surd.cli.adapter import register
from surd.demo.tiny import write_tiny_world

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_world(tmp_path_factory.mktemp("progress"), text_dim=32, n=6)


def _last_line(text: str, label: str) -> str:
    """The last plain progress line of `label` (the one printed when its loop ended)."""
    lines = re.findall(rf"\[surd\] {re.escape(label)}: [^\r\n]*", text)  # after tqdm's `\r` train bar too
    assert lines, text
    return lines[-1]


def test_validation_grid_shows_denoising_progress_and_is_labelled(world, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    prompts = ["a red circle", "a blue square"]
    config = TrainConfig.model_validate(dict(
        data=str(world["run"]), base=str(world["sd"]), llm=str(world["llm"]), out=str(out), max_steps=1,
        resolution=32, batch_size=2, checkpoint_every=0, report_to="none", adapter={"ff_dim": 64},
        validation_every=1, validation_steps=3, validation_prompts=prompts))
    train(config, progress=True)
    # Two prompts, base and adapter, three steps each: every denoising step moved the bar.
    line = _last_line(capsys.readouterr().err, "validation @ 1")
    assert re.match(r"\[surd\] validation @ 1: 12/12 steps \(100%\), [\d.e+-]+ steps/s", line), line
    grid = Image.open(out / "validation" / "step-0000001.png")
    blank = Image.new("RGB", (32, 32))
    assert grid.size == labelled_grid([[blank, blank]] * 2, prompts, ["base", "adapter (sur)"]).size

    train(config.model_copy(update={"max_steps": 2, "resume": "latest"}), progress=False)  # --quiet
    assert "[surd]" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapter_run(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "run"
    return train(TrainConfig.model_validate(dict(
        data=str(world["run"]), base=str(world["sd"]), llm=str(world["llm"]), out=str(out), max_steps=1,
        resolution=32, batch_size=2, checkpoint_every=0, validation_every=0, report_to="none",
        adapter={"ff_dim": 64})), progress=False)


def test_generate_shows_denoising_progress(world, adapter_run, tmp_path) -> None:
    app = typer.Typer()
    register(app)
    args = ["generate", "a red circle", "--base", str(world["sd"]), "--adapter", str(adapter_run), "--steps", "3"]
    result = CliRunner().invoke(app, args + ["-o", str(tmp_path / "one.png")])
    assert result.exit_code == 0, result.output
    assert _last_line(result.stderr, "generate").startswith("[surd] generate: 3/3 steps (100%)")
    result = CliRunner().invoke(app, args + ["-o", str(tmp_path / "two.png"), "--compare"])
    assert _last_line(result.stderr, "generate").startswith("[surd] generate: 6/6 steps (100%)")  # base, adapter
    result = CliRunner().invoke(app, args + ["-o", str(tmp_path / "three.png"), "--quiet"])
    assert result.exit_code == 0 and "[surd]" not in result.stderr


def test_eval_shows_denoising_progress(world, adapter_run, tmp_path, capsys) -> None:
    from adapter.config import EvalConfig
    from adapter.evaluate import run_eval
    from surd.demo.tiny import write_tiny_clip

    config = EvalConfig(base=str(world["sd"]), adapter=adapter_run, clip=str(write_tiny_clip(tmp_path / "clip")),
                        probes=["counting"], limit=1, seeds=[0, 1], steps=3, height=32, width=32, batch_size=2)
    run_eval(config, tmp_path / "eval")
    # Two seeds, base and adapter: four images of three denoising steps each, counted step by step.
    assert _last_line(capsys.readouterr().err, "eval: generate").startswith("[surd] eval: generate: 12/12 steps")
    run_eval(config, tmp_path / "eval")  # every image on disk: nothing to denoise, no bar
    assert "eval: generate" not in capsys.readouterr().err
