"""The Python snippets of docs/adapter.md run as written, on tiny models: only where the models live changes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapter.model import SURAdapter
from surd.demo.tiny import write_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "adapter.md"
MARKER = "<!-- tested: tests/test_python_api.py -->"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tested_snippets(text: str) -> list[str]:
    """Every ```python block right after the marker line."""
    return re.findall(re.escape(MARKER) + r"\n```python\n(.*?)```", text, flags=re.S)


def _run(snippets: list[str], tmp_path: Path, source: Path) -> dict:
    """Run the snippets in one namespace, the doc's hub id and GPU replaced by a tiny folder and the CPU."""
    sd = write_tiny_sd(tmp_path / "sd", text_dim=32)
    torch.manual_seed(0)
    adapter = SURAdapter(32, ff_dim=64, eta=1.0)
    torch.nn.init.normal_(adapter.out.weight, std=0.5)  # a trained adapter changes the image
    adapter.save(tmp_path / "RUN" / "adapter", {"base_model": str(sd)})
    where = {
        '"stable-diffusion-v1-5/stable-diffusion-v1-5"': repr(str(sd)),
        '"RUN/adapter"': repr(str(tmp_path / "RUN" / "adapter")),
        '"cuda"': '"cpu"',
        "torch.float16": "torch.float32",
        '"cat.png"': repr(str(tmp_path / "cat.png")),
    }
    namespace: dict = {}
    for snippet in snippets:
        for written, here in where.items():
            snippet = snippet.replace(written, here)
        exec(compile(snippet, str(source), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


def test_the_readme_python_snippet_runs_as_written(tmp_path) -> None:
    snippets = _tested_snippets((ROOT / "README.md").read_text())
    assert len(snippets) == 1
    _run(snippets, tmp_path, ROOT / "README.md")
    assert np.asarray(Image.open(tmp_path / "cat.png")).shape == (32, 32, 3)


def test_the_documented_python_api_runs_as_written(tmp_path) -> None:
    snippets = _tested_snippets(DOC.read_text())
    assert len(snippets) == 2  # generate_images (every kind), then the stock pipeline call by hand
    namespace = _run(snippets, tmp_path, DOC)
    saved = np.asarray(Image.open(tmp_path / "cat.png"))
    assert saved.shape == (32, 32, 3)
    assert np.array_equal(np.asarray(namespace["image"]), saved)  # by hand == generate_images, same seed
    base = namespace["pipe"]("a cat sleeping on a red sofa", num_inference_steps=30,
                             generator=torch.Generator().manual_seed(0)).images[0]
    assert not np.array_equal(np.asarray(base), saved)  # the adapter took part
