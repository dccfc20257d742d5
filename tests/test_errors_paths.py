"""A source name is a plain folder name: `--name ../../X` or an absolute name never writes outside RUN."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from surd.errors import RecipeError
from surd.sources import source_config

BAD_NAMES = ["../../escaped", "..", ".", "/tmp/abs", "a/b", "a\\b", "", ".hidden", "-flag", "_stats", "dropped",
             "tab\tname", "x" * 65, "nul\0byte"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_source_names_are_refused_in_one_message(tmp_path: Path, name: str) -> None:
    with pytest.raises(RecipeError) as caught:
        source_config({"type": "folder", "path": str(tmp_path), "name": name})
    message = str(caught.value)
    assert "\n" not in message and "collect[folder]" in message and "name" in message
    assert repr(name) in message  # the bad value, quoted


@pytest.mark.parametrize("name", ["civitai", "civitai-2024", "my.source_1", "A1111", "x" * 64])
def test_plain_names_are_accepted(tmp_path: Path, name: str) -> None:
    config = source_config({"type": "folder", "path": str(tmp_path), "name": name})
    assert config.folder == name


def _surd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "surd", *args], capture_output=True, text=True, env=env, timeout=120)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_cli_name_cannot_leave_the_run_folder(tmp_path: Path) -> None:
    table = tmp_path / "in" / "d.jsonl"
    table.parent.mkdir()
    table.write_text('{"prompt": "a lighthouse at dusk over the sea", "url": "http://example.com/a.png"}\n')
    before = _files(tmp_path)
    run = tmp_path / "deep" / "er" / "run"
    for name in ("../../escaped", str(tmp_path / "abs")):
        result = _surd("collect", "jsonl", str(table), "--option", "image_url_column=url", "--out", str(run),
                       "--name", name)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and repr(name) in result.stderr, result.stderr
    assert _files(tmp_path) == before  # nothing written anywhere, RUN included


def test_recipe_name_cannot_leave_the_run_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\ncollect:\n  - {{type: folder, path: {tmp_path / 'images'}, name: ../outside}}\n")
    before = _files(tmp_path)
    result = _surd("run", str(recipe), "--out", str(tmp_path / "run"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "r.yaml" in result.stderr and "'../outside'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _files(tmp_path) == before
