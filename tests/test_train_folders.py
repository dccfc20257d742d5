"""A training folder holds one run: another run is refused (or cleared with --overwrite), --resume says what it
resumed or that there was nothing, and a recipe skips a complete adapter and resumes an interrupted one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from adapter.config import TrainConfig
from adapter.recipe import ModelRecipe
from adapter.train import train, training_plan
from surd.cli.adapter import train_from_recipe
from surd.demo.tiny import write_tiny_dataset, write_tiny_world
from surd.errors import SurdError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_world(tmp_path_factory.mktemp("folders"), text_dim=32, n=8)


SETTINGS = dict(resolution=32, batch_size=2, checkpoint_every=1, validation_every=0, report_to="none",
                adapter={"ff_dim": 64})


def _config(world: dict[str, Path], out: Path, **overrides) -> TrainConfig:
    values = dict(data=str(world["run"]), base=str(world["sd"]), llm=str(world["llm"]), out=str(out), max_steps=2,
                  **SETTINGS)
    values.update(overrides)
    return TrainConfig.model_validate(values)


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def _steps_logged(out: Path) -> list[int]:
    with (out / "logs" / "losses.csv").open() as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_a_folder_holding_another_run_is_refused_and_overwrite_clears_it(world, tmp_path) -> None:
    out = tmp_path / "A"
    train(_config(world, out, max_steps=3, report_to="tensorboard"), progress=False)
    assert _checkpoints(out) == ["checkpoint-0000001", "checkpoint-0000002", "checkpoint-0000003"]
    weights = (out / "adapter.safetensors").read_bytes()

    other = _config(world, out, max_steps=1, seed=7, report_to="tensorboard")
    refusal = "is not empty .*adapter.safetensors, 3 checkpoints.*--resume latest.*--overwrite"
    with pytest.raises(SurdError, match=refusal):
        train(other, progress=False)
    assert (out / "adapter.safetensors").read_bytes() == weights  # nothing was touched

    train(other.model_copy(update={"overwrite": True}), progress=False)
    assert _checkpoints(out) == ["checkpoint-0000001"]  # the other run's checkpoints are gone: none to resume
    assert _steps_logged(out) == [1]
    # One run in TensorBoard: each start writes one scalars file in logs/adapter (hparams go to subfolders).
    assert len(list((out / "logs" / "adapter").glob("events.out.tfevents.*"))) == 1
    assert json.loads((out / "adapter_config.json").read_text())["seed"] == 7


def test_overwrite_clears_only_a_training_folder(world, tmp_path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(SurdError, match="not a training run: todo.txt.*clears only a training folder"):
        train(_config(world, notes, overwrite=True), progress=False)
    assert (notes / "todo.txt").read_text() == "keep me"
    with pytest.raises(SurdError, match="--overwrite clears the folder that --resume would continue"):
        train(_config(world, tmp_path / "x", overwrite=True, resume="latest"), progress=False)


def test_resume_latest_says_what_it_resumed_or_that_there_was_nothing(world, tmp_path, capsys) -> None:
    out = tmp_path / "B"
    train(_config(world, out, resume="latest"), progress=False)
    assert f"--resume latest: {out} holds no run yet: training from step 0" in capsys.readouterr().out

    train(_config(world, out, resume="latest", max_steps=3), progress=False)
    assert f"resuming {out} from checkpoint-0000002 (step 2)" in capsys.readouterr().out
    assert _steps_logged(out) == [1, 2, 3]
    assert json.loads((out / "adapter_config.json").read_text())["steps"] == 3

    done = (out / "adapter.safetensors").stat().st_mtime_ns
    assert training_plan(_config(world, out, resume="latest", max_steps=3)).action == "skip"  # e.g. for a dry run
    assert training_plan(_config(world, out, resume="latest", max_steps=4)).checkpoint == \
        out / "checkpoints" / "checkpoint-0000003"
    train(_config(world, out, resume="latest", max_steps=3), progress=False)
    assert "the adapter is complete for these settings and data (step 3): nothing to train" in capsys.readouterr().out
    assert (out / "adapter.safetensors").stat().st_mtime_ns == done

    with pytest.raises(SurdError, match=r"other settings or data \(learning_rate 0.0001 -> 0.0002\)"):
        train(_config(world, out, resume="latest", learning_rate=2e-4), progress=False)

    no_checkpoints = tmp_path / "C"
    train(_config(world, no_checkpoints, checkpoint_every=0), progress=False)
    train(_config(world, no_checkpoints, checkpoint_every=0, max_steps=3, resume="latest"), progress=False)
    said = capsys.readouterr().out
    assert f"--resume latest: no checkpoint in {no_checkpoints / 'checkpoints'}: training from step 0" in said
    assert _steps_logged(no_checkpoints) == [1, 2, 3]


def test_recipe_skips_a_complete_adapter_resumes_a_checkpoint_and_retrains_on_a_change(world, tmp_path,
                                                                                     capsys) -> None:
    run = write_tiny_dataset(tmp_path / "run", n=6)

    def spec(**train_overrides) -> ModelRecipe:
        section = dict(base=str(world["sd"]), llm=str(world["llm"]), max_steps=2, **SETTINGS)
        section.update(train_overrides)
        return ModelRecipe(collect=[], train=section)

    out = train_from_recipe(spec(), run)
    weights = out / "adapter.safetensors"
    first = (weights.read_bytes(), weights.stat().st_mtime_ns)
    capsys.readouterr()

    train_from_recipe(spec(), run)  # `surd run` on a finished run
    assert "nothing to train" in capsys.readouterr().out
    assert (weights.read_bytes(), weights.stat().st_mtime_ns) == first

    train_from_recipe(spec(max_steps=3), run)  # the recipe asks for more: continue, not start again
    assert f"resuming {out} from checkpoint-0000002 (step 2)" in capsys.readouterr().out
    assert _steps_logged(out) == [1, 2, 3]

    train_from_recipe(spec(max_steps=3, learning_rate=5e-4), run)  # another run: cleared, from step 0
    said = capsys.readouterr().out
    assert "learning_rate 0.0001 -> 0.0005" in said and "retraining from step 0" in said
    assert _steps_logged(out) == [1, 2, 3]
    assert json.loads((out / "train_config.json").read_text())["learning_rate"] == 5e-4

    write_tiny_dataset(run, n=7)  # the data changed: the adapter no longer describes it
    train_from_recipe(spec(max_steps=3, learning_rate=5e-4), run)
    assert "data.rows 6 -> 7" in capsys.readouterr().out


def test_report_to_wandb_offline_logs_every_loss_term_in_one_run_across_a_resume(world, tmp_path,
                                                                                 monkeypatch) -> None:
    pytest.importorskip("wandb")  # the optional extra: pip install 'surd[wandb]' (in `dev` too, so CI runs this)
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network: the run is written under logs/wandb
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "W"
    train(_config(world, out, report_to="wandb"), progress=False)
    train(_config(world, out, report_to="wandb", max_steps=3, resume="latest"), progress=False)
    runs = sorted((out / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2  # one per start ...
    assert len({p.name for p in runs}) == 1  # ... of one W&B run: the resumption continues it (wandb sync merges)
    logged = runs[0].read_bytes()
    for term in (b"loss/loss", b"loss/diffusion", b"loss/llm", b"loss/prompt", b"learning_rate"):
        assert term in logged, term  # every loss term, and the run's settings
