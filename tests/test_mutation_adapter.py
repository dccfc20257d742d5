"""What mutation testing of the adapter found untested: SDXL's pooled head, masked means at their edges, dtypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapter.losses import distill_loss, kl_over_features, offset_noise, paper_kl
from adapter.model import PooledHead, SURAdapter, masked_mean, parameter_count


def test_masked_mean_counts_one_token_once_and_an_empty_row_gives_zeros():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[0, 1, 0], [0, 0, 0]])
    out = masked_mean(x, mask)
    assert torch.equal(out[0], x[0, 1])  # one token: itself, not half of it
    assert torch.equal(out[1], torch.zeros(4))  # no token: divided by at least 1, so zeros rather than NaN


def test_masked_mean_and_offset_noise_keep_the_half_precision_of_their_input():
    x = torch.randn(2, 3, 4).half()
    assert masked_mean(x, torch.ones(2, 3)).dtype == torch.float16
    noise = torch.randn(2, 4, 8, 8).half()
    assert offset_noise(noise, torch.randn(2, 4), 0.1).dtype == torch.float16


def test_pooled_head_is_the_identity_at_init_then_reads_only_the_masked_tokens():
    torch.manual_seed(0)
    dim, pooled_dim = 8, 4
    head = PooledHead(dim, pooled_dim)
    assert parameter_count(head) == (dim + pooled_dim) * pooled_dim + pooled_dim + pooled_dim * pooled_dim + pooled_dim
    pooled, tokens = torch.randn(2, pooled_dim), torch.randn(2, 5, dim)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    assert torch.equal(head(pooled, tokens, mask), pooled)  # zero-initialised output layer: exactly the identity
    with torch.no_grad():
        head.net[2].weight.normal_()
        head.net[2].bias.normal_()
    first, last = head.net[0], head.net[2]
    summary = torch.stack([tokens[0, :2].mean(0), tokens[1, :4].mean(0)])
    hidden = F.silu(F.linear(torch.cat([summary, pooled], dim=-1), first.weight, first.bias))
    expected = pooled + F.linear(hidden, last.weight, last.bias)
    with torch.no_grad():
        out = head(pooled, tokens, mask)
        assert torch.allclose(out, expected, atol=1e-6)
        assert not torch.allclose(out, pooled)
        changed = tokens.clone()
        changed[0, 2:] += 100.0  # outside the mask
        assert torch.equal(head(pooled, changed, mask), out)
        assert head(pooled.half(), tokens, mask).dtype == torch.float16


def _perturbed(adapter: SURAdapter) -> SURAdapter:
    """Non-zero output layers (they start at zero, which would make every path look like the identity)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in adapter.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.5)
    return adapter.eval()


def test_forward_returns_the_pooled_head_of_its_own_output_and_the_projected_teacher():
    torch.manual_seed(0)
    x, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled, teacher = torch.randn(2, 4), torch.randn(2, 6)
    sdxl = _perturbed(SURAdapter(8, depth=1, heads=2, ff_dim=16, pooled_dim=4, dropout=0.0))
    with torch.no_grad():
        out = sdxl(x, mask, return_parts=True, pooled=pooled)
        assert torch.allclose(out.pooled, sdxl.pooled_head(pooled, out.output, mask))
        assert not torch.allclose(out.pooled, sdxl.pooled_head(pooled, out.output, None))  # the mask reaches it
        assert sdxl(x, mask, return_parts=True).pooled is None  # no text_embeds given: none returned
        assert torch.allclose(out.encoded, sdxl.encoder(x))
    paper = _perturbed(SURAdapter(8, depth=1, heads=2, ff_dim=16, llm_dim=6, kind="paper", mix="paper", dropout=0.0))
    with torch.no_grad():
        out = paper(x, mask, return_parts=True, teacher=teacher)
        assert torch.allclose(out.projected, paper.teacher_projection(teacher))
        assert paper(x, mask, return_parts=True).projected is None  # no teacher: nothing to project
    plain = SURAdapter(8, depth=1, heads=2, ff_dim=16, dropout=0.0)
    assert plain(x, mask, return_parts=True, pooled=pooled).pooled is pooled  # no head: text_embeds untouched


def test_an_adapter_saved_before_kinds_existed_loads_as_sur(tmp_path):
    import json

    adapter = SURAdapter(8, depth=1, heads=2, ff_dim=16, llm_dim=6)
    adapter.save(tmp_path)
    config_path = next(p for p in tmp_path.iterdir() if p.suffix == ".json")
    saved = json.loads(config_path.read_text())
    del saved["adapter"]["kind"]
    config_path.write_text(json.dumps(saved))
    loaded = SURAdapter.load(tmp_path)
    assert loaded.kind == "sur" and loaded.llm_projection is not None


def test_distillation_on_tokens_compares_features_with_the_given_temperature():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 1, 5)  # the teacher broadcasts over 3 tokens
    cosine = (1 - F.cosine_similarity(student, teacher.expand_as(student), dim=-1)).mean()
    assert torch.allclose(distill_loss(student, teacher), cosine)  # cosine is the default
    tokens = torch.randn(2, 3, 5)  # per-token teacher: normalised over features, not over tokens and features
    assert torch.allclose(distill_loss(student, tokens, "mse"), F.mse_loss(student, F.layer_norm(tokens, (5,))))
    assert torch.allclose(distill_loss(student, teacher, "kl", temperature=2.0),
                          kl_over_features(student, teacher.expand_as(student), 2.0))
    assert not torch.allclose(distill_loss(student, teacher, "kl", temperature=2.0),
                              distill_loss(student, teacher, "kl"))
    assert torch.allclose(distill_loss(student, teacher, "paper", temperature=2.0), paper_kl(teacher, student, 2.0))
    assert not torch.allclose(distill_loss(student, teacher, "paper", temperature=2.0),
                              distill_loss(student, teacher, "paper"))
