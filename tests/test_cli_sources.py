"""`surd collect SOURCE --help` lists that source's options (generated from its config); a missing one is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from surd.sources import SOURCE_TYPES, source_config_model, source_help


def surd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "surd", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("kind", SOURCE_TYPES)
def test_every_option_of_every_source_is_listed_with_its_description(kind: str) -> None:
    model = source_config_model(kind)
    text = source_help(kind)
    for name, field in model.model_fields.items():
        if name == "type":
            continue
        assert f"\n  {name} " in text, (kind, name)
        if field.description:
            assert " ".join(field.description.split()[:4]) in " ".join(text.split()), (kind, name)
        if field.is_required():
            line = next(x for x in text.splitlines() if x.startswith(f"  {name} "))
            assert "required" in line, line


def test_jsonl_help_names_its_required_columns() -> None:
    result = surd("collect", "jsonl", "--help")
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert "--out" in out  # the command's own options come first
    for needle in ("jsonl source", "path", "required", "prompt_column", "default: prompt", "image_column",
                   "image_url_column", "one of image_column, image_url_column is required", "--option KEY=VALUE"):
        assert needle in out, needle
    # after PATH too, and for an API source
    assert "jsonl source" in surd("collect", "jsonl", "some/file.jsonl", "--help").stdout
    civitai = surd("collect", "civitai", "--help")
    assert civitai.returncode == 0 and "api_key_env" in civitai.stdout and "CIVITAI_API_KEY" in civitai.stdout


def test_collect_help_without_a_source_lists_the_sources() -> None:
    result = surd("collect", "--help")
    assert result.returncode == 0, result.stderr
    assert all(kind in result.stdout for kind in SOURCE_TYPES)
    assert "surd collect SOURCE --help" in " ".join(result.stdout.split())


def test_unknown_source_with_help_is_one_line() -> None:
    result = surd("collect", "jsonll", "--help")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "'jsonll'" in result.stderr


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["jsonl"], ["path", "required", "surd collect jsonl --help"]),
        (["jsonl", "d.jsonl"], ["image_column", "image_url_column", "surd collect jsonl --help"]),
        (["folder", ".", "--option", "colour=red"], ["colour", "surd collect folder --help"]),
    ],
)
def test_a_missing_or_unknown_option_is_one_line_naming_it(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    (tmp_path / "d.jsonl").write_text('{"prompt": "a cat on a mat", "file": "a.png"}\n')
    result = subprocess.run([sys.executable, "-m", "surd", "collect", *args, "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    line = result.stderr.strip()
    assert line.splitlines() == [line] and line.startswith("error: collect[")
    assert "pydantic" not in line and "http" not in line
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (tmp_path / "o").exists()
