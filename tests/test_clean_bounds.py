"""The prompt cleaner on crafted prompts: bounded, iterative, linear, and identical to the recursive original."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import given, settings
from hypothesis import strategies as st

from surd.clean import MAX_RAW_CHARS, CleanConfig, clean_prompt, embeddings_pattern, strip_attention, tidy_separators
from surd.rows import Drop

EMB = embeddings_pattern(["easynegative", "bad-hands-5"])


class TooSlow(Exception):
    pass


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging) when the block runs longer than `seconds` (a quadratic or exponential cleaner)."""

    def expire(signum: int, frame: object) -> None:
        raise TooSlow(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def clean_row(prompt: str, **extra: object) -> dict | Drop:
    row = {"id": "t:1", "source": "t", "image": {"bytes": None, "path": None}, "keyword_prompt_raw": prompt, **extra}
    return CleanConfig().build().process_row(row)


# ---- the crafted inputs of issue 11, finding 4 ----


def test_three_thousand_openers_clean_without_recursion_error() -> None:
    with deadline(5):
        assert clean_prompt("(" * 3000 + "a red fox in the snow") == "a red fox in the snow"
        assert clean_prompt("[" * 3000 + "a fox:a wolf:0.5" + "]" * 3000) == "a wolf"
        assert clean_prompt("(" * 50_000 + "x" + ")" * 50_000) == "x"


def test_ten_megabyte_prompt_is_a_drop_not_a_hang() -> None:
    huge = "masterpiece " * (10_000_000 // 12)
    with deadline(5):
        out = clean_row(huge)
    assert isinstance(out, Drop) and out.reason == "prompt_too_long"
    assert f"max_raw_chars {MAX_RAW_CHARS}" in out.detail and str(len(huge)) in out.detail
    assert out.row["keyword_prompt_raw"] == huge  # the dropped row keeps what the source gave
    # A huge negative prompt drops the row the same way (it is cleaned too).
    with deadline(5):
        negative = clean_row("a lighthouse at sunset", negative_prompt="(" * 5_000_000)
    assert isinstance(negative, Drop) and negative.reason == "prompt_too_long" and "negative" in negative.detail


def test_worst_case_under_the_bound_is_fast() -> None:
    # Deepest nesting around the most text that fits the bound: every level copies what it encloses.
    half = MAX_RAW_CHARS // 2
    worst = ["(" * half + "x" * (half - 1), "(a:" * (MAX_RAW_CHARS // 3), "[" * half + "|" * (half - 1),
             "(" + "1" * (MAX_RAW_CHARS - 4) + "x:)", "\\(" * half, " " * MAX_RAW_CHARS + "x"]
    started = time.perf_counter()
    with deadline(10):
        for prompt in worst:
            clean_row(prompt)
    assert time.perf_counter() - started < 2.0


def test_separators_and_weights_are_linear() -> None:
    # Long runs that the old regexes scanned once per starting position (quadratic), and a weight that never ends.
    with deadline(5):
        assert tidy_separators(" " * 1_000_000 + "x") == "x"
        assert tidy_separators("a" + " \t" * 500_000 + "b") == "a b"
        assert tidy_separators("a" + " ," * 500_000 + "b") == "a, b"
        assert strip_attention("(word:" + "1" * 1_000_000 + "x)") == "word:" + "1" * 1_000_000 + "x"


# ---- the same output as the recursive parser it replaces, on every prompt ----

_NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*")
_CLOSER = {"(": ")", "[": "]"}


def _reference_resolve(opener: str | None, chunks: list[str], seps: list[str]) -> str:
    def join(cs: list[str], ss: list[str]) -> str:
        return cs[0] + "".join(s + c for s, c in zip(ss, cs[1:], strict=True))

    numeric_tail = len(chunks) >= 2 and seps[-1] == ":" and _NUMBER.fullmatch(chunks[-1]) is not None
    if opener == "(":
        return join(chunks[:-1], seps[:-1]) if numeric_tail else join(chunks, seps)
    if opener == "[":
        if "|" in seps:
            return chunks[0]
        if numeric_tail and len(chunks) == 3:
            return chunks[1]
        if numeric_tail and len(chunks) == 2:
            return chunks[0]
    return join(chunks, seps)


def _reference_parse(text: str, i: int, opener: str | None) -> tuple[str, int]:
    """The recursive parser of surd/clean.py before issue 11 (the behaviour to keep), as an oracle."""
    closer = _CLOSER.get(opener or "")
    chunks, seps = [""], []
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "()[]\\":
            chunks[-1] += text[i + 1]
            i += 2
        elif c in _CLOSER:
            inner, i = _reference_parse(text, i + 1, c)
            chunks[-1] += inner
        elif c == closer:
            return _reference_resolve(opener, chunks, seps), i + 1
        elif c in ")]":
            i += 1
        elif opener is not None and c in ":|":
            seps.append(c)
            chunks.append("")
            i += 1
        else:
            chunks[-1] += c
            i += 1
    return _reference_resolve(opener, chunks, seps), len(text)


def _reference_tidy(text: str) -> str:
    text = re.sub(r"\s*[\r\n]+\s*", ", ", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s*,[\s,]*", ", ", text)
    return text.strip(" ,;|")


prompt_text = st.lists(
    st.sampled_from(["(", ")", "[", "]", ":", "|", "\\", "\\(", "\\]", "1.2", " 0.5 ", "-.3", "cat", "a b", ",",
                     " ", "\n", "\t", "\u2028", "BREAK", "<lora:x:1>", "easynegative", "embedding:e", ";", "7"]),
    max_size=40,
).map("".join)


@settings(max_examples=600, deadline=None)
@given(prompt_text)
def test_same_output_as_the_recursive_parser(text: str) -> None:
    assert strip_attention(text) == _reference_parse(text, 0, None)[0]
    assert tidy_separators(text) == _reference_tidy(text)
