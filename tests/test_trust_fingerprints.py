"""Stage fingerprints: a changed recipe or stage setting rebuilds what it changes (and says so), never less.

Issue #11, finding 1: a run rerun with another `clean.min_side` reused the old `clean/` and everything after it;
`surd clean RUN --set min_side=300` printed the old numbers; after deleting `clean/` by hand, later stages kept
reporting old counts. Each test below builds its run from the offline demo images and compares a changed run
with a fresh run of the changed recipe, row for row.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from openai_server import FakeOpenAI

from pipelines.local import run_stage
from pipelines.recipe import load_recipe
from pipelines.registry import stage_config
from pipelines.run import run_recipe
from surd import shards
from surd.demo import make_demo_data

SURD = [sys.executable, "-m", "surd"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([*SURD, *args], capture_output=True, text=True, env=env, timeout=600)


def _write_recipe(path: Path, images: Path, clean: str = "{}", rows_per_shard: int = 8, extra: str = "") -> Path:
    path.write_text(
        f"name: trust\ncollect:\n  - type: folder\n    path: {images}\n    rows_per_shard: {rows_per_shard}\n"
        f"clean: {clean}\ndedup: {{}}\n{extra}export:\n  test_fraction: 0.3\n"
    )
    return path


def _rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "surd" / "data").glob("*.parquet")):
        rows += pq.read_table(path).drop_columns(["image"]).to_pylist()
    return sorted(rows, key=lambda r: r["id"])


def _stats(out: Path) -> dict:
    result = _cli("stats", str(out), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _files(out: Path) -> dict[str, int]:
    """Every file of a run folder with its modification time: what a no-op must leave untouched."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".surd-lock"}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trust-images") / "images"
    make_demo_data(out)
    return out


@pytest.fixture(scope="module")
def finished(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the plain recipe (copied by tests that change it)."""
    root = tmp_path_factory.mktemp("trust-run")
    out = root / "out"
    run_recipe(load_recipe(_write_recipe(root / "recipe.yaml", images), out), out, progress=False)
    return out


@pytest.fixture(scope="module")
def fresh_300(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run made from the start with `clean.min_side: 300`: what a changed run must equal."""
    root = tmp_path_factory.mktemp("trust-300")
    out = root / "out"
    run_recipe(load_recipe(_write_recipe(root / "r.yaml", images, "{min_side: 300}"), out), out, progress=False)
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def test_changed_recipe_setting_rebuilds_the_stage_and_every_later_one(
    finished: Path, fresh_300: Path, images: Path, tmp_path: Path
) -> None:
    run = _copy(finished, tmp_path)
    recipe = _write_recipe(tmp_path / "changed.yaml", images, "{min_side: 300}")
    result = _cli("run", str(recipe), "--out", str(run), "-q")
    assert result.returncode == 0, result.stderr
    assert "clean: min_side 64 -> 300; rebuilding clean, dedup, export" in result.stderr
    assert _rows(run) == _rows(fresh_300)
    assert _stats(run) == _stats(fresh_300)
    assert _stats(run)["clean"]["dropped"]["image_too_small"] > _stats(finished)["clean"]["dropped"]["image_too_small"]


def test_stage_command_with_another_setting_rebuilds_instead_of_printing_old_numbers(
    finished: Path, fresh_300: Path, tmp_path: Path
) -> None:
    run = _copy(finished, tmp_path)
    result = _cli("clean", str(run), "--set", "min_side=300", "-q")
    assert result.returncode == 0, result.stderr
    assert "clean: min_side 64 -> 300; rebuilding clean, dedup, export" in result.stderr
    expected = _stats(fresh_300)
    small = expected["clean"]["dropped"]["image_too_small"]
    assert f"image_too_small: {small}" in result.stdout
    stats = _stats(run)
    early = ("collect", "clean", "dedup")
    assert {k: stats[k] for k in early} == {k: expected[k] for k in early}
    assert "export" not in stats  # built from the old clean: removed, rebuilt by the next export


def test_a_stage_deleted_by_hand_makes_later_stages_stale_then_rebuilt(
    finished: Path, images: Path, tmp_path: Path
) -> None:
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "clean")
    stats = _stats(run)
    assert "clean" not in stats
    assert stats["dedup"]["stale"] == "its input clean/ is gone"
    assert "stale" in stats["export"]
    table = _cli("stats", str(run))
    assert "stale" in table.stdout
    result = _cli("run", str(_write_recipe(tmp_path / "r.yaml", images)), "--out", str(run), "-q")
    assert result.returncode == 0, result.stderr
    assert "clean: its folder is missing" in result.stderr and "rebuilding clean, dedup, export" in result.stderr
    assert not any("stale" in s for s in _stats(run).values())
    assert _rows(run) == _rows(finished)


def test_a_run_with_nothing_to_do_says_so_and_writes_nothing(finished: Path, images: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    before = _files(run)
    # batch sizes and CPUs per worker only pace a stage: changing them rebuilds nothing
    recipe = _write_recipe(tmp_path / "r.yaml", images, "{batch_size: 5, num_cpus: 2}")
    result = _cli("run", str(recipe), "--out", str(run), "-q")
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    assert "rebuilding" not in result.stderr
    assert _files(run) == before


def test_from_rebuilds_a_stage_and_every_later_one(finished: Path, images: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    clean_before = _files(run / "clean")
    result = _cli("run", str(_write_recipe(tmp_path / "r.yaml", images)), "--out", str(run), "--from", "dedup", "-q")
    assert result.returncode == 0, result.stderr
    assert "dedup: --from dedup; rebuilding dedup, export" in result.stderr
    assert _files(run / "clean") == clean_before  # before the stage: untouched
    assert (run / "dedup" / shards.MANIFEST).stat().st_mtime_ns > max(clean_before.values())
    assert _rows(run) == _rows(finished)
    bad = _cli("run", str(tmp_path / "r.yaml"), "--out", str(run), "--from", "cleen")
    assert bad.returncode == 1 and "--from 'cleen'" in bad.stderr and "Traceback" not in bad.stderr


def test_changed_source_option_rebuilds_that_source_and_what_follows(
    finished: Path, images: Path, tmp_path: Path
) -> None:
    run = _copy(finished, tmp_path)
    recipe = _write_recipe(tmp_path / "r.yaml", images, rows_per_shard=5)
    result = _cli("run", str(recipe), "--out", str(run), "-q")
    assert result.returncode == 0, result.stderr
    assert "collect folder: rows_per_shard 8 -> 5; rebuilding collect/folder, clean, dedup, export" in result.stderr
    partitions = json.loads((run / "collect" / "folder" / "_listing.json").read_text())["partitions"]
    assert max(len(p) for p in partitions) == 5
    assert len(shards.shard_names(run / "collect")) == len(partitions)
    assert all(json.loads((run / s / "_fingerprint.json").read_text())["input"]["shards"]
               == shards.shard_names(run / prev) for prev, s in (("collect", "clean"), ("clean", "dedup")))
    assert _rows(run) == _rows(finished)  # the same rows, in other shards


def test_a_source_or_stage_dropped_from_the_recipe_is_removed(finished: Path, images: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    other = tmp_path / "other-images"
    shutil.copytree(images, other)  # the same files under the same relative names: the same ids
    two = tmp_path / "two.yaml"
    two.write_text(f"name: trust\ncollect:\n  - {{type: folder, path: {images}, rows_per_shard: 8}}\n"
                   f"  - {{type: folder, name: extra, path: {other}}}\nclean: {{}}\ndedup: {{}}\n"
                   "export: {test_fraction: 0.3}\n")
    result = _cli("run", str(two), "--out", str(run), "-q")
    assert result.returncode == 0, result.stderr
    assert "collect extra: a new source; rebuilding clean, dedup, export" in result.stderr
    assert _stats(run)["collect"]["dropped"]["duplicate_id"] > 0  # the same files again: the same ids
    # back to the plain recipe without dedup: the extra source and the dedup folder go, the rows follow
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"name: trust\ncollect:\n  - {{type: folder, path: {images}, rows_per_shard: 8}}\n"
                     "clean: {}\nexport: {test_fraction: 0.3}\n")
    result = _cli("run", str(plain), "--out", str(run), "-q")
    assert result.returncode == 0, result.stderr
    assert "collect extra: not in the recipe any more" in result.stderr
    assert "dedup: not in the recipe any more; removing dedup/" in result.stderr
    assert not (run / "collect" / "extra").exists() and not (run / "dedup").exists()
    assert list(_stats(run)) == ["collect", "clean", "export"]
    assert json.loads((run / "export" / "_fingerprint.json").read_text())["input"]["stage"] == "clean"


def test_dry_run_prints_the_plan_and_writes_nothing(finished: Path, images: Path, tmp_path: Path) -> None:
    new = tmp_path / "new"
    result = _cli("run", str(_write_recipe(tmp_path / "r.yaml", images)), "--out", str(new), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert not new.exists()
    assert "collect folder: will run" in result.stdout and "export: will run" in result.stdout
    run = _copy(finished, tmp_path)
    before = _files(run)
    changed = _write_recipe(tmp_path / "c.yaml", images, "{min_side: 300}")
    result = _cli("run", str(changed), "--out", str(run), "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "collect folder: done" in lines
    assert "clean: will rebuild (min_side 64 -> 300)" in lines
    assert "dedup: will rebuild (its input clean changes first)" in lines
    assert _files(run) == before
    same = _cli("run", str(tmp_path / "r.yaml"), "--out", str(run), "--dry-run")
    assert "nothing to do" in same.stdout and "will" not in same.stdout.replace("will be", "")


def test_export_rebuilds_only_when_its_settings_or_reviews_change(finished: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    before = _files(run)
    same = _cli("export", str(run), "--test-fraction", "0.3", "-q")
    assert same.returncode == 0, same.stderr
    assert _files(run) == before  # the same export: left as it is
    other = _cli("export", str(run), "--test-fraction", "0.5", "-q")
    assert other.returncode == 0, other.stderr
    assert "export: test_fraction 0.3 -> 0.5; rebuilding export" in other.stderr
    from surd.schema import split_for

    assert all(r["split"] == split_for(r["id"], 0.5) for r in _rows(run))
    # a reviewer rejects one row: the reviews file's content is part of export's fingerprint
    import pyarrow as pa

    first = _rows(run)[0]["id"]
    pq.write_table(pa.table({"id": [first], "decision": ["rejected"]}), run / "reviews.parquet")
    reviewed = _cli("export", str(run), "--test-fraction", "0.5", "-q")
    assert reviewed.returncode == 0, reviewed.stderr
    assert "export: reviews" in reviewed.stderr and "rebuilding export" in reviewed.stderr
    assert first not in {r["id"] for r in _rows(run)}


def _pair_recipe(path: Path, images: Path, server: FakeOpenAI, max_words: int) -> Path:
    pair = (f"pair: {{backend: openai, base_url: '{server.base_url}', model: served, api_key_env: null, k: 2, "
            f"max_words: {max_words}, cache_path: '${{out}}/_cache/pair.sqlite'}}\n")
    return _write_recipe(path, images, extra=pair)


def test_a_rebuilt_pair_stage_reuses_the_request_cache(images: Path, tmp_path: Path) -> None:
    def answer(messages: list[dict[str, str]], body: dict) -> str:
        number = sum(map(ord, messages[-1]["content"])) % 997
        return f"A quiet drawing of {number} small boats near a harbour, version {body['seed']}."

    out = tmp_path / "out"
    with FakeOpenAI(answer) as server:
        run_recipe(load_recipe(_pair_recipe(tmp_path / "a.yaml", images, server, 40), out), out, progress=False)
        asked = len(server.requests)
        assert asked > 0
        before = shards.stage_stats(out / "pair")
        # a validation setting may change pair's rows (a rebuild), not one request: every answer is in the cache
        run_recipe(load_recipe(_pair_recipe(tmp_path / "b.yaml", images, server, 30), out), out, progress=False)
        assert len(server.requests) == asked
        after = shards.stage_stats(out / "pair")
        assert after["counters"].get("cache_hits", 0) >= before["counters"]["llm_requests"]
        assert "llm_requests" not in after["counters"]
        assert json.loads((out / "pair" / "_fingerprint.json").read_text())["settings"]["max_words"] == 30


def test_pacing_settings_of_the_model_stages_do_not_change_their_rows(finished: Path, tmp_path: Path) -> None:
    """The pacing rule, checked: nsfw and score give the same rows at other batch sizes, threads and workers."""
    from surd.demo.tiny import write_tiny_clip

    clip = write_tiny_clip(tmp_path / "clip")
    score = {"model": str(clip), "pretrained": None, "min_narrative_percentile": 20}
    results = []
    for pace in ({"batch_size": 256, "inference_batch_size": 64, "num_workers": 0, "num_cpus": 1, "threads": None},
                 {"batch_size": 3, "inference_batch_size": 2, "num_workers": 2, "num_cpus": 2, "threads": 1}):
        run = tmp_path / f"run-{pace['batch_size']}"
        shutil.copytree(finished / "collect", run / "collect")
        shutil.copytree(finished / "clean", run / "clean")
        run_stage(run, "nsfw", stage_config("nsfw", {"mode": "flag", "batch_size": min(pace["batch_size"], 32),
                                                     "threads": pace["threads"]}), progress=False)
        config = {k: v for k, v in pace.items() if k != "threads"}
        run_stage(run, "score", stage_config("score", {**score, **config}), progress=False)
        results.append({stage: (shards.read_stage_table(run / stage).to_pylist(),
                                [r for b in shards.read_dropped(run / stage) for r in b.to_pylist()])
                        for stage in ("nsfw", "score")})
        assert json.loads((run / "score" / "_fingerprint.json").read_text())["settings"] == json.loads(
            (tmp_path / "run-256" / "score" / "_fingerprint.json").read_text())["settings"]
    assert results[0]["nsfw"] == results[1]["nsfw"]  # bit for bit
    # score's batches change the order of float sums: its scores agree to float32 rounding, everything else exactly
    (kept_a, dropped_a), (kept_b, dropped_b) = results[0]["score"], results[1]["score"]
    assert dropped_a == dropped_b and len(kept_a) == len(kept_b) > 0
    for a, b in zip(kept_a, kept_b, strict=True):
        floats = ("clip_keyword", "clip_narrative")
        assert {k: v for k, v in a.items() if k not in floats} == {k: v for k, v in b.items() if k not in floats}
        assert all(a[k] == pytest.approx(b[k], abs=1e-6) for k in floats if a[k] is not None)
