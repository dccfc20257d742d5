"""SURAdapter: per-sample encoding, identity at init, deterministic inference, save/load, original import.

`_OriginalAdapter` restates the published module (non-batch-first encoder, raw-value attention, fc with a
zeroed weight only) so the tests can show each property fails on it and holds on ours.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from adapter.convert import convert_original
from adapter.model import CONFIG_NAME, WEIGHTS_NAME, SURAdapter, masked_mean
from surd.errors import SurdError

DIM = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _OriginalAttention(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.query_layer = nn.Linear(hidden_size, hidden_size)
        self.key_layer = nn.Linear(hidden_size, hidden_size)
        self.value_layer = nn.Linear(hidden_size, hidden_size)
        self.output_layer = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        scores = self.query_layer(query) @ self.key_layer(key).transpose(-2, -1) / self.hidden_size**0.5
        weighted = torch.softmax(scores, dim=-1) @ value + value
        return self.output_layer(weighted) + weighted


class _OriginalAdapter(nn.Module):
    def __init__(self, depth: int = 2, adapter_weight: float = 0.1, sd_text_size: int = DIM, ff: int = 64) -> None:
        super().__init__()
        self.adapter_weight = adapter_weight
        self.encoder_layer = nn.TransformerEncoderLayer(d_model=sd_text_size, nhead=8, dim_feedforward=ff)
        self.transformer_encoder = nn.TransformerEncoder(self.encoder_layer, num_layers=depth,
                                                         enable_nested_tensor=False)
        self.attention = _OriginalAttention(sd_text_size)
        self.fc = nn.Linear(sd_text_size, sd_text_size)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoded = self.transformer_encoder(x)
        out = self.fc(self.attention(query=encoded, key=x, value=x))
        return self.adapter_weight * out + (1 - self.adapter_weight) * x


def _adapter(**kwargs) -> SURAdapter:
    torch.manual_seed(0)
    return SURAdapter(DIM, ff_dim=64, **kwargs)


def _trained_like(adapter: nn.Module) -> nn.Module:
    """Give the zero-initialised output layer weights, as training would, so the branch matters."""
    torch.manual_seed(1)
    for module in adapter.modules():
        if isinstance(module, nn.Linear) and module.weight.abs().sum() == 0:
            nn.init.normal_(module.weight, std=0.2)
            nn.init.normal_(module.bias, std=0.2)
    return adapter


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_changing_one_sample_leaves_the_others_unchanged(mode: str) -> None:
    adapter = _trained_like(_adapter(dropout=0.0))
    getattr(adapter, mode)()
    x = torch.randn(3, 77, DIM)
    changed = x.clone()
    changed[1] = torch.randn(77, DIM)
    out, out_changed = adapter(x), adapter(changed)
    assert not torch.allclose(out[1], out_changed[1])  # sample 1 did change ...
    torch.testing.assert_close(out_changed[0], out[0], rtol=0, atol=1e-6)  # ... sample 0 did not
    torch.testing.assert_close(out_changed[2], out[2], rtol=0, atol=1e-6)
    # The original layout attends across the batch: the same edit moves sample 0.
    original = _trained_like(_OriginalAdapter()).eval()
    assert not torch.allclose(original(x)[0], original(changed)[0], atol=1e-4)


def test_a_tokens_do_attend_to_each_other_within_a_sample() -> None:
    adapter = _trained_like(_adapter(dropout=0.0)).eval()
    x = torch.randn(1, 77, DIM)
    changed = x.clone()
    changed[0, 5] += 1.0
    assert not torch.allclose(adapter(x)[0, 0], adapter(changed)[0, 0])


def test_d_residual_mix_is_exactly_the_identity_at_init() -> None:
    adapter = _adapter()
    x = torch.randn(2, 77, DIM)
    assert torch.equal(adapter.eval()(x), x)
    assert torch.equal(adapter.train()(x), x)  # dropout inside the branch cannot leak: the output layer is 0
    # Neither the paper's mix nor the original (random fc bias) is the identity.
    assert not torch.allclose(_adapter(mix="paper")(x), x)
    assert not torch.allclose(_OriginalAdapter().eval()(x), x)


def test_paper_mix_is_eta_weighted() -> None:
    adapter = _trained_like(_adapter(mix="paper", eta=0.3)).eval()
    x = torch.randn(2, 77, DIM)
    parts = adapter(x, return_parts=True)
    torch.testing.assert_close(parts.output, 0.3 * parts.branch + 0.7 * x)
    residual = _trained_like(_adapter(eta=0.3)).eval()
    parts = residual(x, return_parts=True)
    torch.testing.assert_close(parts.output, x + 0.3 * parts.branch)


def test_e_identical_inference_calls_give_identical_embeddings(tiny_pipe) -> None:
    from adapter.inference import encode_prompts

    adapter = _trained_like(_adapter(dropout=0.5))
    adapter.train()  # left in training mode by a caller: inference must switch dropout off itself
    first = encode_prompts(tiny_pipe, ["a red circle", "a blue square"], adapter)
    second = encode_prompts(tiny_pipe, ["a red circle", "a blue square"], adapter)
    assert torch.equal(first, second)
    assert not adapter.training
    base = encode_prompts(tiny_pipe, ["a red circle", "a blue square"])
    assert not torch.allclose(first, base)  # the adapter really was applied


def test_projection_pools_real_tokens_only() -> None:
    adapter = _trained_like(_adapter(llm_dim=48)).eval()
    x = torch.randn(2, 77, DIM)
    mask = torch.zeros(2, 77, dtype=torch.long)
    mask[:, :5] = 1
    parts = adapter(x, mask=mask, return_parts=True)
    assert parts.projected.shape == (2, 48)
    expected = adapter.llm_projection(parts.output[:, :5].mean(dim=1))
    torch.testing.assert_close(parts.projected, expected)
    torch.testing.assert_close(masked_mean(parts.output, None), parts.output.mean(dim=1))


def test_save_and_load_round_trip(tmp_path) -> None:
    adapter = _trained_like(_adapter(llm_dim=48, eta=0.2, mix="paper"))
    adapter.save(tmp_path, {"base_model": "x"})
    loaded = SURAdapter.load(tmp_path)
    assert not loaded.training
    x = torch.randn(2, 77, DIM)
    torch.testing.assert_close(loaded(x), adapter.eval()(x))
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["adapter"]["llm_dim"] == 48 and config["base_model"] == "x"
    with pytest.raises(SurdError, match="adapter_config.json"):
        SURAdapter.load(tmp_path / "missing")


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(SurdError, match="heads"):
        SURAdapter(30, heads=8)
    with pytest.raises(ValueError, match="expects"):
        _adapter()(torch.randn(2, 77, DIM + 1))


def test_convert_original_maps_weights_and_fixes_the_layout(tmp_path) -> None:
    torch.manual_seed(3)
    original = _trained_like(_OriginalAdapter(adapter_weight=0.1)).eval()
    ckpt = tmp_path / "adapter_checkpoint100.pt"
    torch.save(original.state_dict(), ckpt)
    converted = SURAdapter.load(convert_original(ckpt, tmp_path / "out", eta=0.1))
    assert converted.mix == "paper" and converted.config["depth"] == 2 and converted.config["ff_dim"] == 64
    x = torch.randn(3, 77, DIM)
    # What the original computes when its encoder is given the sequence axis it was meant to have.
    with torch.no_grad():
        encoded = original.transformer_encoder(x.transpose(0, 1)).transpose(0, 1)
        expected = 0.1 * original.fc(original.attention(query=encoded, key=x, value=x)) + 0.9 * x
        torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "out" / WEIGHTS_NAME).is_file()


def test_convert_original_refuses_pickled_code_and_foreign_files(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"fc.weight": Evil()}, bad)
    with pytest.raises(SurdError, match="weights_only"):
        convert_original(bad, tmp_path / "out")
    other = tmp_path / "other.pt"
    torch.save({"something": torch.zeros(2)}, other)
    with pytest.raises(SurdError, match="fc.weight"):
        convert_original(other, tmp_path / "out")


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from adapter.inference import load_pipeline
    from surd.demo.tiny import write_tiny_sd

    return load_pipeline(str(write_tiny_sd(tmp_path_factory.mktemp("sd") / "sd", text_dim=DIM)))
