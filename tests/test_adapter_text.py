"""Prompt encoding matches the stock pipelines (SD and SDXL), frozen parts load in the requested dtype, auto
precision, SDXL time ids."""

from __future__ import annotations

import pytest
import torch

from adapter.inference import load_pipeline
from adapter.text import PromptEncoder, crop_time_ids
from surd.demo.tiny import write_tiny_sd, write_tiny_sdxl, write_tiny_teacher
from surd.models import precision_dtype, resolve_precision

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("text")
    return {"sd": write_tiny_sd(root / "sd", text_dim=32), "sdxl": write_tiny_sdxl(root / "sdxl"),
            "llm": write_tiny_teacher(root / "llm")}


@pytest.mark.parametrize("base", ["sd", "sdxl"])
def test_encoding_equals_the_pipelines_own(folders, base: str) -> None:
    pipe = load_pipeline(str(folders[base]))
    prompts = ["a red circle", "a blue square on a white background"]
    ours = PromptEncoder.of(pipe)(prompts)
    theirs = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(ours.hidden, theirs[0])
    if base == "sdxl":
        assert torch.equal(ours.pooled, theirs[2]) and ours.hidden.shape[-1] == PromptEncoder.of(pipe).dim == 64
    else:
        assert ours.pooled is None
    unpadded = [len(pipe.tokenizer(p).input_ids) for p in prompts]  # BOS + the prompt's tokens + EOS
    assert ours.mask.sum(1).tolist() == unpadded and ours.mask[:, 0].tolist() == [1, 1]


@pytest.mark.parametrize("base", ["sd", "sdxl"])
def test_frozen_parts_load_in_the_requested_dtype(folders, base: str) -> None:
    pipe = load_pipeline(str(folders[base]), dtype=torch.bfloat16)
    frozen = [pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    assert {next(m.parameters()).dtype for m in frozen if m is not None} == {torch.bfloat16}


def test_teacher_loads_in_the_requested_dtype(folders) -> None:
    from adapter.teacher import load_teacher

    assert next(load_teacher(str(folders["llm"]), dtype=torch.bfloat16).model.parameters()).dtype == torch.bfloat16


def test_auto_precision_prefers_bf16_where_the_device_has_it(monkeypatch) -> None:
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("fp16", "cpu") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda:0") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "fp16"
    assert precision_dtype("bf16") == torch.bfloat16 and precision_dtype("no") == torch.float32


def test_sdxl_time_ids_follow_the_centre_crop() -> None:
    # 40 wide, 48 high at 32 px: scale 0.8 -> 32 x 38, centre crop starts 3 rows down, 0 columns in.
    assert crop_time_ids(40, 48, 32).tolist() == [48, 40, 3, 0, 32, 32]
    assert crop_time_ids(None, None, 32).tolist() == [32, 32, 0, 0, 32, 32]
