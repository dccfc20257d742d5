"""Shared test setup: offline hubs, the `slow` marker, temp HOME-like dirs."""

from __future__ import annotations

import os

import pytest

# Model hubs are unreachable here: anything that tries to download must fail fast, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow (or set SURD_SLOW=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # CI has the time budget for the slow tests (the packaged SmolLM2, ~5 minutes); a laptop run skips them.
    if config.getoption("--runslow") or os.environ.get("SURD_SLOW") == "1" or os.environ.get("CI") == "true":
        return
    skip = pytest.mark.skip(reason="slow test: run with --runslow or SURD_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is faster and far steadier under load."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
