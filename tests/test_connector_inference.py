"""The connector at inference reads the LLM's states of every row, including batches of empty negative prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapter.inference import AdapterRuntime
from adapter.teacher import load_teacher
from surd.demo.tiny import write_tiny_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_llm_states_of_rows_whose_first_batch_is_all_empty_prompts(tmp_path: Path) -> None:
    # Under guidance the rows are [negatives; prompts]: 16 empty negatives fill the LLM's first batch, whose
    # tokenizer gives "" no token at all (SmolLM2's and this one alike); that batch once crashed the LLM.
    runtime = AdapterRuntime(torch.nn.Linear(1, 1), load_teacher(str(write_tiny_llm(tmp_path / "llm"))), -1)
    prompts = ["a red ball on the left", "a blue box"]
    batch = runtime.llm_states([""] * 16 + prompts, torch.device("cpu"))
    assert batch.states.shape[0] == 18 and int(batch.mask[:16].sum()) == 0 and int(batch.mask[16:].sum(1).min()) > 0
    alone = runtime.llm_states(prompts, torch.device("cpu"))  # a prompt's states do not depend on its batch
    width = alone.states.shape[1]
    assert torch.allclose(batch.states[16:, :width], alone.states, atol=1e-5)
    assert torch.equal(batch.mask[16:, :width], alone.mask)
