"""The kinds behind `adapter.kind`: presets, what each conditions the UNet with, where gradient flows, the
connector's dependence on the timestep and the LLM, caption dropout, and the distillation actually used."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from adapter.config import REFERENCE, AdapterSettings, LossSettings, TrainConfig
from adapter.connector import Connector
from adapter.kinds import LLMBatch, ReproductionWarning, aux_losses, build, condition
from adapter.losses import content_mask
from adapter.step import EmptyPrompt, compute_losses
from adapter.text import PromptEncoder, TextBatch

DIM, LLM = 32, 24

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from adapter.inference import load_pipeline
    from adapter.step import prepare_frozen
    from surd.demo.tiny import write_tiny_sd

    sd = write_tiny_sd(tmp_path_factory.mktemp("kinds") / "sd", text_dim=DIM)
    return prepare_frozen(load_pipeline(str(sd)), torch.device("cpu"), checkpointing=False)


def _settings(kind: str, **extra) -> AdapterSettings:
    values = {"kind": kind, "ff_dim": 64, "heads": 4, "width": 32, "tokens": 6, "depth": 2} | extra
    return AdapterSettings.model_validate(values)


def _batch(pipe, n: int = 3, llm_tokens: int = 5) -> dict:
    torch.manual_seed(0)
    prompts = ["a red circle", "a blue square on white", "green"][:n]
    tokens = PromptEncoder.of(pipe).tokenize(prompts)
    keyword = PromptEncoder.of(pipe).tokenize([p + ", masterpiece, 8k" for p in prompts])
    return {"id": list(range(n)), "latent_params": torch.randn(n, 8, 16, 16),
            "narrative_ids": tokens["ids"], "narrative_mask": tokens["mask"],
            "keyword_ids": keyword["ids"], "keyword_mask": keyword["mask"],
            "teacher": torch.randn(n, LLM), "teacher_tokens": torch.randn(n, llm_tokens, LLM),
            "teacher_tokens_mask": torch.ones(n, llm_tokens, dtype=torch.long)}


def test_presets_fill_what_the_user_left_out() -> None:
    paper = TrainConfig.model_validate({"base": "x", "adapter": {"kind": "paper"}})
    assert paper.adapter.mix == "paper" and paper.learning_rate == 1e-5
    assert (paper.loss.llm_weight, paper.loss.prompt_weight) == (1e-5, 1e-5)
    assert (paper.loss.llm_loss, paper.loss.prompt_loss) == ("paper", "paper")
    mine = TrainConfig.model_validate({"base": "x", "learning_rate": 3e-4, "adapter": {"kind": "paper"},
                                       "loss": {"prompt_weight": 0.5}})
    assert mine.learning_rate == 3e-4 and mine.loss.prompt_weight == 0.5 and mine.loss.llm_weight == 1e-5
    sur = TrainConfig.model_validate({"base": "x"})
    assert sur.adapter.kind == "sur" and sur.adapter.mix == "residual" and sur.loss.llm_loss == "cosine"
    assert sur.caption_dropout == 0.1
    connector = TrainConfig.model_validate({"base": "x", "adapter": {"kind": "connector"}})
    assert connector.loss.llm_weight == 0 and connector.keep_teacher_tokens


def test_reference_kind_is_not_selectable_by_accident() -> None:
    with pytest.raises(ValidationError, match=REFERENCE):
        TrainConfig.model_validate({"base": "x", "adapter": {"kind": "reference"}})
    config = TrainConfig.model_validate({"base": "x", "adapter": {"kind": REFERENCE}})
    assert config.caption_dropout == 0.0 and config.adapter.mix == "paper"
    with pytest.warns(ReproductionWarning, match="WITH its defects"):
        build(_settings(REFERENCE), DIM, LLM)


def test_sur_distillation_is_the_cosine_of_the_projected_content_mean(pipe) -> None:
    adapter = build(_settings("sur"), DIM, LLM).eval()  # dropout off: the two forward passes below agree
    torch.nn.init.normal_(adapter.out.weight, std=0.2)
    batch = _batch(pipe)
    text = PromptEncoder.of(pipe).encode({"ids": batch["narrative_ids"], "mask": batch["narrative_mask"]})
    llm = LLMBatch(batch["teacher"])
    cond = condition(adapter, text, llm, torch.tensor([5, 5, 5]))
    terms = aux_losses(adapter, cond, text, None, llm, None, LossSettings(prompt_weight=0.0))
    output = adapter(text.hidden)
    expected = []
    for row, n in zip(output, text.mask.sum(1).tolist(), strict=True):
        pooled = row[1:n].mean(0)  # BOS (position 0) and padding left out
        projected = adapter.llm_projection(pooled)
        expected.append(1 - torch.nn.functional.cosine_similarity(projected, batch["teacher"][len(expected)], dim=0))
    torch.testing.assert_close(terms["llm"], torch.stack(expected).mean())


def test_paper_distillation_broadcasts_the_resized_teacher_over_the_encoder_tokens(pipe) -> None:
    from adapter.losses import paper_kl

    adapter = build(_settings("paper"), DIM, LLM)
    batch = _batch(pipe)
    text = PromptEncoder.of(pipe).encode({"ids": batch["narrative_ids"], "mask": batch["narrative_mask"]})
    llm = LLMBatch(batch["teacher"])
    cond = condition(adapter, text, llm, torch.tensor([5, 5, 5]))
    terms = aux_losses(adapter, cond, text, None, llm, None, TrainConfig.model_validate(
        {"base": "x", "adapter": {"kind": "paper"}}).loss)
    resized = adapter.teacher_projection(batch["teacher"])
    torch.testing.assert_close(terms["llm"], paper_kl(resized[:, None, :], cond.parts.encoded))
    terms["llm"].backward()
    assert adapter.teacher_projection.weight.grad.abs().sum() > 0  # the resize is trained (the original froze it)


def _diffusion_grads(pipe, adapter, batch) -> dict[str, torch.Tensor | None]:
    adapter.zero_grad()
    terms = compute_losses(batch, adapter, pipe, pipe.scheduler, LossSettings(llm_weight=0.0, prompt_weight=0.0),
                           torch.Generator().manual_seed(0))
    assert set(terms) == {"diffusion", "loss"}
    if terms["loss"].requires_grad:
        terms["loss"].backward()
    return {n: p.grad for n, p in adapter.named_parameters()}


def test_reference_kind_keeps_the_defects_on_purpose(pipe) -> None:
    with pytest.warns(ReproductionWarning):
        adapter = build(_settings(REFERENCE), DIM, LLM)
    batch = _batch(pipe)
    # detached: the diffusion loss alone gives the adapter no gradient at all
    assert all(g is None for g in _diffusion_grads(pipe, adapter, batch).values())
    # frozen random resize, V = x frozen, not the identity at init (random output bias)
    assert not adapter.teacher_projection.weight.requires_grad and not adapter.attention.value.weight.requires_grad
    x = torch.randn(3, 77, DIM)
    assert adapter.out.bias.abs().sum() > 0
    # attention across the batch: editing sample 1 moves sample 0
    adapter.eval()
    changed = x.clone()
    changed[1] = torch.randn(77, DIM)
    torch.nn.init.normal_(adapter.out.weight, std=0.2)
    assert not torch.allclose(adapter(x)[0], adapter(changed)[0], atol=1e-5)


@pytest.mark.parametrize("kind", ["sur", "paper", "connector"])
def test_diffusion_loss_alone_reaches_every_trained_parameter(pipe, kind: str) -> None:
    adapter = build(_settings(kind), DIM, LLM)
    if kind != "connector":  # the zero-initialised output layer must move first for the rest to get gradient
        torch.nn.init.normal_(adapter.out.weight, std=0.2)
    grads = _diffusion_grads(pipe, adapter, _batch(pipe))
    # paper's resize only meets the distillation term; sur's projection too
    skip = ("llm_projection", "teacher_projection")
    missing = [n for n, g in grads.items() if not n.startswith(skip) and (g is None or g.abs().sum() == 0)]
    assert missing == []


def test_connector_output_depends_on_timestep_and_llm_states() -> None:
    torch.manual_seed(0)
    connector = Connector(DIM, LLM, tokens=6, width=32, depth=2, heads=4, ff_dim=64).eval()
    states, mask = torch.randn(2, 5, LLM), torch.ones(2, 5, dtype=torch.long)
    text = torch.randn(2, 77, DIM)
    early = connector(states, mask, torch.tensor([900, 900]), text=text)
    late = connector(states, mask, torch.tensor([10, 10]), text=text)
    assert early.output.shape == (2, 77 + 6, DIM)
    torch.testing.assert_close(early.output[:, :77], text)  # join: the CLIP tokens stay as they are
    assert not torch.allclose(early.tokens, late.tokens, atol=1e-4)  # timestep-aware
    other = connector(states + torch.randn_like(states), mask, torch.tensor([900, 900]), text=text)
    assert not torch.allclose(early.tokens, other.tokens, atol=1e-4)  # reads the LLM
    # padding is ignored: a padded row gives the same tokens as the unpadded one
    padded = torch.cat([states, torch.randn(2, 3, LLM)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(connector(padded, padded_mask, torch.tensor([900, 900]), text=text).tokens,
                               early.tokens, rtol=1e-5, atol=1e-5)
    # samples never mix, and "replace" hands the UNet only the connector's tokens
    replace = Connector(DIM, LLM, tokens=6, width=32, depth=2, heads=4, ff_dim=64, conditioning="replace").eval()
    assert replace(states, mask, torch.tensor([3, 3])).output.shape == (2, 6, DIM)
    one = replace(states[:1], mask[:1], torch.tensor([3])).output
    torch.testing.assert_close(one[0], replace(states, mask, torch.tensor([3, 3])).output[0], rtol=1e-5, atol=1e-5)


def test_caption_dropout_trains_on_the_empty_prompt(pipe) -> None:
    adapter = build(_settings("sur"), DIM, LLM)
    torch.nn.init.normal_(adapter.out.weight, std=0.2)
    encoder = PromptEncoder.of(pipe)
    empty = EmptyPrompt(encoder([""]))
    batch = _batch(pipe)
    loss = LossSettings(llm_weight=1.0, prompt_weight=1.0)
    dropped = compute_losses(batch, adapter, pipe, pipe.scheduler, loss, torch.Generator().manual_seed(1), 1.0, empty)
    blank = dict(batch)
    tokens = encoder.tokenize([""] * 3)
    blank["narrative_ids"], blank["narrative_mask"] = tokens["ids"], tokens["mask"]
    # The same draws (the dropout draw comes after noise and timesteps), the narrative replaced by "".
    reference = compute_losses(blank, adapter, pipe, pipe.scheduler, LossSettings(llm_weight=0.0, prompt_weight=0.0),
                               torch.Generator().manual_seed(1))
    torch.testing.assert_close(dropped["diffusion"], reference["diffusion"])
    assert dropped["llm"].item() == 0.0 and dropped["prompt"].item() == 0.0  # nothing to distil from ""
    kept = compute_losses(batch, adapter, pipe, pipe.scheduler, loss, torch.Generator().manual_seed(1), 0.0)
    assert kept["llm"].item() > 0 and not torch.allclose(kept["diffusion"], dropped["diffusion"])


def test_v_prediction_base_trains_on_velocity(tmp_path) -> None:
    """Through compute_losses on an SD 2.x-shaped (v-prediction) stack: the diffusion term is the MSE to v."""
    from adapter.data import sample_latents
    from adapter.inference import load_pipeline
    from adapter.step import prepare_frozen
    from surd.demo.tiny import write_tiny_sd

    pipe = prepare_frozen(load_pipeline(str(write_tiny_sd(tmp_path / "sd2", text_dim=1024))), torch.device("cpu"),
                          checkpointing=False)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    adapter = build(_settings("sur"), 1024, None)  # the identity at init: the UNet sees the CLIP tokens
    batch = _batch(pipe)
    terms = compute_losses(batch, adapter, pipe, pipe.scheduler, LossSettings(llm_weight=0.0, prompt_weight=0.0),
                           torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # replay the step's draws in their order
    latents = sample_latents(batch["latent_params"], pipe.vae.config, g)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (3,), generator=g)
    ac = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = ac.sqrt() * noise - (1 - ac).sqrt() * latents
    text = PromptEncoder.of(pipe).encode({"ids": batch["narrative_ids"], "mask": batch["narrative_mask"]})
    with torch.no_grad():
        pred = pipe.unet(pipe.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text.hidden).sample
    assert terms["diffusion"].item() == pytest.approx(torch.mean((pred - v) ** 2).item(), rel=1e-4)
    assert terms["diffusion"].item() != pytest.approx(torch.mean((pred - noise) ** 2).item(), rel=1e-2)


def test_pooled_head_is_the_identity_at_init_and_learns() -> None:
    adapter = build(_settings("sur"), DIM, None, pooled_dim=16)
    x, pooled = torch.randn(2, 77, DIM), torch.randn(2, 16)
    mask = content_mask(torch.ones(2, 77, dtype=torch.long))
    parts = adapter(x, mask=mask, return_parts=True, pooled=pooled)
    assert torch.equal(parts.output, x) and torch.equal(parts.pooled, pooled)
    parts.pooled.square().sum().backward()
    assert adapter.pooled_head.net[2].weight.grad.abs().sum() > 0
    passthrough = build(_settings("sur", pooled="passthrough"), DIM, None, pooled_dim=16)
    assert passthrough.pooled_head is None


def test_text_batch_replaces_rows() -> None:
    text = TextBatch(torch.zeros(3, 4, 2), torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 5))
    other = TextBatch(torch.ones(1, 4, 2), torch.ones(1, 4, dtype=torch.long), torch.ones(1, 5))
    mixed = text.where(torch.tensor([False, True, False]), other)
    assert mixed.hidden[:, 0, 0].tolist() == [0, 1, 0] and mixed.pooled[:, 0].tolist() == [0, 1, 0]


def test_ema_warms_up_averages_and_round_trips(tmp_path) -> None:
    from adapter.ema import EMA

    module = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(module.weight)
    ema = EMA(module, decay=0.5)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema.update(module)  # step 1: d = min(0.5, 2/11) = 2/11 -> 2/11·0 + 9/11·1
    assert ema.shadow["weight"].item() == pytest.approx(9 / 11)
    with torch.no_grad():
        module.weight.fill_(3.0)
    ema.update(module)  # step 2: d = min(0.5, 3/12) = 1/4 -> 1/4·9/11 + 3/4·3
    assert ema.shadow["weight"].item() == pytest.approx(0.25 * 9 / 11 + 0.75 * 3)
    ema.save(tmp_path)
    restored = EMA(module, decay=0.5)
    restored.load(tmp_path)
    assert restored.steps == 2 and restored.shadow["weight"].item() == pytest.approx(ema.shadow["weight"].item())
    restored.copy_to(module)
    assert module.weight.item() == pytest.approx(ema.shadow["weight"].item())
