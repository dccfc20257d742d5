"""Every loss function called directly, with inputs small enough to compute the expected value by hand.

The schedule below has betas (0.2, 0.5): ᾱ = (0.8, 0.4), SNR = ᾱ/(1−ᾱ) = (4, 2/3).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from adapter.losses import (
    align_loss,
    content_mask,
    diffusion_loss,
    diffusion_target,
    distill_loss,
    kl_over_features,
    min_snr_weights,
    offset_noise,
    paper_kl,
    snr,
)


def _scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=2, trained_betas=[0.2, 0.5], prediction_type=prediction_type)


def test_epsilon_target_is_the_noise() -> None:
    latents, noise = torch.full((1, 1, 1, 1), 1.0), torch.full((1, 1, 1, 1), 2.0)
    assert torch.equal(diffusion_target(_scheduler("epsilon"), latents, noise, torch.tensor([1])), noise)


def test_v_prediction_target_is_velocity_not_noise() -> None:
    # v = √ᾱ·ε − √(1−ᾱ)·x₀ at t = 1: √0.4·2 − √0.6·1
    latents, noise = torch.full((1, 1, 1, 1), 1.0), torch.full((1, 1, 1, 1), 2.0)
    v = diffusion_target(_scheduler("v_prediction"), latents, noise, torch.tensor([1]))
    assert v.item() == pytest.approx(math.sqrt(0.4) * 2 - math.sqrt(0.6) * 1, abs=1e-6)
    assert v.item() != pytest.approx(2.0)
    with pytest.raises(ValueError, match="sample"):
        diffusion_target(_scheduler("sample"), latents, noise, torch.tensor([1]))


def test_snr_and_min_snr_weights() -> None:
    t = torch.tensor([0, 1])
    torch.testing.assert_close(snr(_scheduler("epsilon"), t), torch.tensor([4.0, 2 / 3]))
    # γ = 1: ε-prediction min(SNR, 1)/SNR = (1/4, 1); v-prediction min(SNR, 1)/(SNR + 1) = (1/5, (2/3)/(5/3))
    torch.testing.assert_close(min_snr_weights(_scheduler("epsilon"), t, 1.0), torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(min_snr_weights(_scheduler("v_prediction"), t, 1.0), torch.tensor([0.2, 0.4]))


def test_diffusion_loss_is_the_per_sample_mse_optionally_weighted() -> None:
    pred = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[[1.0, 1.0]]], [[[2.0, 0.0]]]])  # per-sample MSE: 1 and 2
    t = torch.tensor([0, 1])
    scheduler = _scheduler("epsilon")
    assert diffusion_loss(pred, target, t, scheduler).item() == pytest.approx(1.5)
    assert diffusion_loss(pred, target, t, scheduler, snr_gamma=1.0).item() == pytest.approx((0.25 * 1 + 1 * 2) / 2)


def test_offset_noise_adds_one_value_per_sample_and_channel() -> None:
    noise = torch.zeros(1, 2, 2, 2)
    out = offset_noise(noise, torch.tensor([[1.0, -2.0]]), 0.1)
    torch.testing.assert_close(out[0, 0], torch.full((2, 2), 0.1))
    torch.testing.assert_close(out[0, 1], torch.full((2, 2), -0.2))


def test_content_mask_drops_bos_and_padding() -> None:
    assert content_mask(torch.tensor([[1, 1, 1, 0]])).tolist() == [[0, 1, 1, 0]]


def test_distillation_kinds_by_hand() -> None:
    # cosine: 1 − cos([1, 0], [1, 1]) = 1 − 1/√2
    assert distill_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), "cosine").item() == \
        pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    # mse against the layer-normalised teacher: LN([1, 3]) = [−1, 1]; student 0 -> 1
    assert distill_loss(torch.zeros(1, 2), torch.tensor([[1.0, 3.0]]), "mse").item() == pytest.approx(1.0, abs=1e-4)
    # kl = KL(softmax(teacher) ‖ softmax(student)): p = (3/4, 1/4), q = (1/2, 1/2)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    assert distill_loss(torch.zeros(1, 2), teacher, "kl").item() == pytest.approx(kl, abs=1e-6)
    # paper: KL(softmax(student) ‖ softmax(teacher)) per token, the teacher broadcast, SUMMED over 2 tokens
    paper = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    student_tokens = torch.zeros(1, 2, 2)
    assert distill_loss(student_tokens, teacher[:, None], "paper").item() == pytest.approx(2 * paper, abs=1e-6)
    # the token-mean KL against the same broadcast target
    assert distill_loss(student_tokens, teacher[:, None], "kl").item() == pytest.approx(kl, abs=1e-6)


def test_paper_kl_is_the_reference_codes_batchmean() -> None:
    x, y = torch.randn(3, 1, 4), torch.randn(3, 5, 4)
    expected = torch.nn.functional.kl_div(torch.log_softmax(x, -1).expand_as(y), torch.softmax(y, -1),
                                          reduction="batchmean")
    torch.testing.assert_close(paper_kl(x, y), expected)
    torch.testing.assert_close(paper_kl(x, y, temperature=2.0), 4 * paper_kl(x / 2, y / 2))
    assert kl_over_features(y, y).item() == pytest.approx(0.0, abs=1e-6)


def test_alignment_pools_without_bos_on_both_sides() -> None:
    # BOS (a huge, identical vector) and padding would make the two pooled vectors nearly parallel.
    adapted = torch.tensor([[[100.0, 0.0], [0.0, 1.0], [0.0, 1.0], [5.0, 5.0]]])
    keyword = torch.tensor([[[100.0, 0.0], [1.0, 0.0], [1.0, 0.0], [7.0, 7.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert align_loss(adapted, mask, keyword, mask, "cosine").item() == pytest.approx(1.0, abs=1e-6)  # orthogonal
    # A different BOS changes nothing; content does.
    moved = adapted.clone()
    moved[0, 0] = torch.tensor([-50.0, 3.0])
    assert align_loss(moved, mask, keyword, mask, "cosine").item() == pytest.approx(1.0, abs=1e-6)
    assert align_loss(keyword, mask, keyword, mask, "cosine").item() == pytest.approx(0.0, abs=1e-6)


def test_alignment_kl_options_by_hand() -> None:
    adapted = torch.zeros(1, 2, 2)  # softmax (1/2, 1/2) at both positions
    keyword = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # (3/4, 1/4) then (1/2, 1/2)
    kl_first = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert align_loss(adapted, None, keyword, None, "kl").item() == pytest.approx(kl_first / 2, abs=1e-6)
    paper_first = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(adapted ‖ keyword), summed
    assert align_loss(adapted, None, keyword, None, "paper").item() == pytest.approx(paper_first, abs=1e-6)
