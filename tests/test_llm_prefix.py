"""Shared-prefix KV caching in the transformers backend: exactly the outputs of the plain left-padded path."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from surd.demo.tiny import write_tiny_llm
from surd.llm import Sampling, TransformersLLM, load_template

# suffixes of very different token lengths, so rows get different amounts of padding between prefix and suffix
KEYWORDS = ["a", "masterpiece, 1girl, red dress, garden, 8k, soft light, highly detailed, film grain, bokeh",
            "two dogs", "x y z, w, sunset over the sea"]


@pytest.fixture(scope="module")
def peaky_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a larger init std gives peaky logits, so greedy outputs differ per input and any error in the KV reuse shows
    return write_tiny_llm(tmp_path_factory.mktemp("llm"), init_std=0.3)


def conversations(template: str = "rewrite-v1") -> list[list[dict[str, str]]]:
    t = load_template(template)
    return [t.messages({"keyword_prompt": k, "caption": f"a photo of {k}"}) for k in KEYWORDS]


def test_greedy_outputs_match_the_uncached_path_batched_and_one_by_one(peaky_llm: Path) -> None:
    greedy = Sampling(temperature=0.0, max_new_tokens=10)
    plain = TransformersLLM(str(peaky_llm), batch_size=8, prefix_cache=False).generate(conversations(), 1, greedy)
    assert len({x[0] for x in plain}) == len(KEYWORDS)  # type: ignore[index]  # the model's outputs depend on input
    batched = TransformersLLM(str(peaky_llm), batch_size=8)
    single = TransformersLLM(str(peaky_llm), batch_size=1)
    assert batched.generate(conversations(), 1, greedy) == plain
    assert single.generate(conversations(), 1, greedy) == plain
    assert batched.prefix_builds == 1 and single.prefix_builds == 1  # computed once, reused by every later call
    prefix = next(iter(batched._prefixes))
    assert len(prefix) > 100  # the system prompt and few-shot turns, not just a few tokens
    assert batched.generate(conversations()[::-1], 1, greedy) == plain[::-1] and batched.prefix_builds == 1


def test_a_second_template_gets_its_own_prefix(peaky_llm: Path) -> None:
    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    cached = TransformersLLM(str(peaky_llm), batch_size=3)
    plain = TransformersLLM(str(peaky_llm), batch_size=3, prefix_cache=False)
    for template in ("rewrite-v1", "caption-rewrite-v1", "rewrite-v1"):
        assert cached.generate(conversations(template), 1, greedy) == plain.generate(conversations(template), 1, greedy)
    assert cached.prefix_builds == 2 and len(cached._prefixes) == 2


def test_seeded_sampling_with_several_candidates_is_deterministic_and_matches(peaky_llm: Path) -> None:
    sampling = Sampling(temperature=1.0, max_new_tokens=8, seed=5)
    cached = TransformersLLM(str(peaky_llm), batch_size=4)
    first = cached.generate(conversations(), 3, sampling)
    assert [len(x) for x in first] == [3] * len(KEYWORDS)  # type: ignore[arg-type]
    assert len(set(first[0])) > 1  # type: ignore[arg-type]  # the candidates really are sampled
    assert cached.generate(conversations(), 3, sampling) == first
    assert TransformersLLM(str(peaky_llm), batch_size=4, prefix_cache=False).generate(
        conversations(), 3, sampling) == first
    assert cached.generate(conversations(), 3, Sampling(temperature=1.0, max_new_tokens=8, seed=6)) != first
    clone = pickle.loads(pickle.dumps(cached))  # the cached tensors stay behind, like the model
    assert clone._prefixes == {} and clone.prefix_cache


def test_conversations_without_a_shared_head_use_the_plain_path(peaky_llm: Path) -> None:
    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    bare = [[{"role": "user", "content": k}] for k in KEYWORDS]
    cached = TransformersLLM(str(peaky_llm), batch_size=4)
    plain = TransformersLLM(str(peaky_llm), batch_size=4, prefix_cache=False)
    assert cached.generate(bare, 1, greedy) == plain.generate(bare, 1, greedy)
    assert cached.prefix_builds == 0


def test_rows_sharing_more_than_the_template_head_match_too(peaky_llm: Path) -> None:
    # the batch's common tokens beyond the cached head are computed once per batch; the head cache stays intact
    t = load_template("rewrite-v1")
    same_start = [t.messages({"keyword_prompt": f"masterpiece, best quality, {k}"}) for k in KEYWORDS]
    greedy = Sampling(temperature=0.0, max_new_tokens=8)
    cached = TransformersLLM(str(peaky_llm), batch_size=4)
    plain = TransformersLLM(str(peaky_llm), batch_size=4, prefix_cache=False)
    for batch in (same_start, conversations(), same_start):
        assert cached.generate(batch, 1, greedy) == plain.generate(batch, 1, greedy)
    assert cached.prefix_builds == 1


def test_preallocated_layer_holds_what_concatenation_would_and_grows_past_its_capacity() -> None:
    import torch

    from surd.llm_cache import PreallocatedLayer

    head_k, head_v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    layer = PreallocatedLayer(head_k.expand(3, -1, -1, -1), head_v.expand(3, -1, -1, -1), capacity=7)
    expected_k, expected_v = head_k.expand(3, -1, -1, -1), head_v.expand(3, -1, -1, -1)
    for new in (2, 1, 1, 3):  # 5 + 2 fills the buffer exactly; the next token forces it to grow
        k, v = torch.randn(3, 2, new, 4), torch.randn(3, 2, new, 4)
        got_k, got_v = layer.update(k, v)
        expected_k, expected_v = torch.cat([expected_k, k], -2), torch.cat([expected_v, v], -2)
        assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v)
        assert layer.get_seq_length() == expected_k.shape[-2]
    assert torch.equal(head_k, layer.keys[1:2, :, :5])  # the stored head is copied, never written to
    layer.batch_select_indices(torch.tensor([0, 2]))  # generate may reassign the tensors; updates must still fit
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    assert torch.equal(layer.update(k, v)[0], torch.cat([expected_k[[0, 2]], k], -2))
