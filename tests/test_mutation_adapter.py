"""What mutation testing of the adapter found untested: SDXL's pooled head, masked means at their edges, dtypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapter.losses import offset_noise
from adapter.model import PooledHead, masked_mean, parameter_count


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
