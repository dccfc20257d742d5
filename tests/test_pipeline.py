"""End to end through the local executor: folder source -> clean -> dedup -> export, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.local import run_stage
from pipelines.recipe import load_recipe
from pipelines.registry import stage_config
from pipelines.run import run_recipe
from surd import shards
from surd.demo import EXPECTED_KEPT, PLANTED, make_demo_data

ROOT = Path(__file__).resolve().parents[1]
SURD = [sys.executable, "-m", "surd"]
CLEAN_REASONS = {
    "empty_prompt", "prompt_too_short", "prompt_too_long", "image_too_small", "undecodable_image",
}
DEDUP_REASONS = {"duplicate_image", "near_duplicate_image", "duplicate_pair"}


def _recipe(tmp: Path, images: Path, rows_per_shard: int = 8) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(
        "name: test\n"
        f"collect:\n  - type: folder\n    path: {images}\n    rows_per_shard: {rows_per_shard}\n"
        "clean: {}\ndedup: {}\nexport:\n  test_fraction: 0.3\n"
    )
    return path


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "images"
    make_demo_data(out)
    return out


@pytest.fixture(scope="module")
def finished_run(demo_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    run_recipe(load_recipe(_recipe(tmp, demo_images), out), out, progress=False)
    return out


def _final_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "surd" / "data").glob("*.parquet")):
        rows += pq.read_table(path, columns=["id", "keyword_prompt", "split", "sha256"]).to_pylist()
    return sorted(rows, key=lambda r: r["id"])


def test_every_drop_reason_shows_up_and_rows_add_up(finished_run: Path) -> None:
    clean = shards.stage_stats(finished_run / "clean")
    dedup = shards.stage_stats(finished_run / "dedup")
    collect = shards.stage_stats(finished_run / "collect")
    assert CLEAN_REASONS <= set(clean["dropped"]), clean
    assert DEDUP_REASONS <= set(dedup["dropped"]), dedup
    assert "no_prompt" in collect["dropped"]
    # Nothing disappears: every row is either kept or dropped with a reason, at every stage.
    for stats, upstream in ((clean, collect), (dedup, clean)):
        assert stats["in"] == upstream["kept"]
        assert stats["in"] == stats["kept"] + sum(stats["dropped"].values())
    dropped = list(shards.read_dropped(finished_run / "clean", columns=["drop_stage", "drop_reason"]))
    assert sum(b.num_rows for b in dropped) == sum(clean["dropped"].values())
    # The demo plants each problem a known number of times; every one must be caught exactly.
    every_drop = {**collect["dropped"], **clean["dropped"], **dedup["dropped"]}
    assert every_drop == PLANTED
    final = _final_rows(finished_run)
    assert len(final) == dedup["kept"] == EXPECTED_KEPT
    assert len({r["id"] for r in final}) == len(final)
    assert len({r["sha256"] for r in final}) == len(final)


def test_export_loads_with_datasets_and_decodes_images(finished_run: Path, tmp_path: Path) -> None:
    # A fresh cache: `datasets` caches a local folder by its path, and pytest reuses temp paths across sessions.
    ds = datasets.load_dataset(str(finished_run / "surd"), cache_dir=str(tmp_path / "hf"))
    assert set(ds) == {"train", "test"}
    total = sum(len(ds[s]) for s in ds)
    assert total == len(_final_rows(finished_run))
    row = ds["train"][0]
    assert isinstance(row["image"], Image.Image)
    assert row["image"].size == (row["width"], row["height"])
    assert ds["train"].features["phash"].dtype == "uint64"
    assert all(s == "train" for s in ds["train"]["split"])
    parquet_ds = datasets.load_dataset(
        "parquet", data_dir=str(finished_run / "surd" / "data"), cache_dir=str(tmp_path / "hf2")
    )
    assert isinstance(parquet_ds["train"][0]["image"], Image.Image)
    card = (finished_run / "surd" / "README.md").read_text()
    assert card.startswith("---\nconfigs:")
    assert "near_duplicate_image" in card


def test_split_is_stable_and_matches_fraction(finished_run: Path) -> None:
    from surd.schema import split_for

    rows = _final_rows(finished_run)
    assert all(r["split"] == split_for(r["id"], 0.3) for r in rows)


def test_rerun_is_a_no_op(finished_run: Path, demo_images: Path, tmp_path: Path) -> None:
    before = _final_rows(finished_run)
    stats_before = shards.stage_stats(finished_run / "clean")
    run_recipe(load_recipe(_recipe(tmp_path, demo_images), finished_run), finished_run, progress=False)
    assert _final_rows(finished_run) == before
    assert shards.stage_stats(finished_run / "clean") == stats_before


def test_two_workers_write_the_same_rows(demo_images: Path, finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_recipe(load_recipe(_recipe(tmp_path, demo_images), out), out, workers=2, progress=False)
    assert _final_rows(out) == _final_rows(finished_run)


def _no_seconds(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "seconds"}


def test_stage_built_from_another_input_is_rebuilt_not_mixed(finished_run: Path, tmp_path: Path, capfd) -> None:
    # Pretend dedup was built from another input (one shard fewer): resuming it would mix rows, so it is rebuilt,
    # and so is every stage after it, with one line saying why.
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "dedup" / "_fingerprint.json"
    record = json.loads(path.read_text())
    record["input"]["shards"] = record["input"]["shards"][:-1]
    path.write_text(json.dumps(record))
    stats = run_stage(run, "dedup", stage_config("dedup", {}), progress=False)
    err = capfd.readouterr().err
    assert "dedup: input clean has other shards" in err and "rebuilding dedup, export" in err, err
    assert _no_seconds(stats) == _no_seconds(shards.stage_stats(finished_run / "dedup"))
    assert not (run / "export").exists()  # built from the old dedup: gone until the next export
    assert json.loads(path.read_text())["input"]["shards"] == shards.shard_names(run / "clean")


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*SURD, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_cli_stats_json(finished_run: Path) -> None:
    result = _cli("stats", str(finished_run), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert list(data) == ["collect", "clean", "dedup", "export"]
    assert data["clean"]["kept"] == data["dedup"]["in"]
    assert set(data["dedup"]["dropped"]) == DEDUP_REASONS


@pytest.mark.parametrize(
    "text, needle",
    [
        ("name: x\ncollect: []\ncleen: {}\n", "cleen"),
        ("name: x\ncollect: [{type: folder, path: p, colour: red}]\n", "colour"),
        ("name: x\ncollect: []\nclean: {min_side: -3}\n", "min_side"),
        ("name: x\ncollect: [{type: nowhere}]\n", "nowhere"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_recipe_names_the_key_without_traceback(tmp_path: Path, text: str, needle: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    result = _cli("run", str(recipe), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert needle in result.stderr
    assert "bad.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_inputs_are_clear_errors(tmp_path: Path) -> None:
    result = _cli("clean", str(tmp_path / "nothing"))
    assert result.returncode == 1 and "collect" in result.stderr and "Traceback" not in result.stderr
    result = _cli("collect", "folder", str(tmp_path / "absent"), "--out", str(tmp_path / "o"))
    assert result.returncode == 1 and "absent" in result.stderr and "Traceback" not in result.stderr
    result = _cli("run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o"))
    assert result.returncode == 1 and "nope.yaml" in result.stderr


def test_stage_commands_chain_like_the_recipe(demo_images: Path, finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "steps"
    for args in (
        ("collect", "folder", str(demo_images), "--out", str(out), "--rows-per-shard", "8", "-q"),
        ("clean", str(out), "-q"),
        ("export", str(out), "--test-fraction", "0.3"),
    ):
        result = _cli(*args)
        assert result.returncode == 0, result.stderr
    assert _final_rows(out) == _final_rows(finished_run)


def test_export_imagefolder_round_trips_through_the_imagefolder_source(finished_run: Path, tmp_path: Path) -> None:
    result = _cli("export", str(finished_run), "--format", "imagefolder", "--test-fraction", "0.3")
    assert result.returncode == 0, result.stderr
    folder = finished_run / "surd-imagefolder"
    lines = [json.loads(x) for s in ("train", "test") for x in (folder / s / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == len(_final_rows(finished_run))
    assert all((folder / s / "metadata.jsonl").exists() for s in ("train", "test"))
    out = tmp_path / "back"
    result = _cli("collect", "imagefolder", str(folder / "train"), "--out", str(out), "-q")
    assert result.returncode == 0, result.stderr
    back = shards.read_stage_table(out / "collect", columns=["keyword_prompt_raw"]).column(0).to_pylist()
    train = [x["prompt"] for x in (json.loads(line) for line in (folder / "train" / "metadata.jsonl").open())]
    assert sorted(back) == sorted(train)
