"""Prompt weights and prompt editing in all the syntax people write (a narrower weight pattern fails here)."""

from __future__ import annotations

import pytest

from surd.clean import _is_weight, clean_prompt, strip_attention, tidy_separators

# A1111 parses a weight with float(): integers, a leading or trailing dot, a sign, spaces around it.
WEIGHTS = ["2", "0", ".5", "1.", "1.25", "-1", "-.5", "+1.5", " 1.2 ", "\t0.9", "10", "007", "3.000"]
NOT_WEIGHTS = ["", " ", ".", "-", "+", "1.2.3", "1e3", "abc", "1 2", "1,2", "--1", "+-1", "..5", "1..", "0x1", "inf"]


@pytest.mark.parametrize("weight", WEIGHTS)
def test_attention_with_every_weight_spelling_keeps_only_the_text(weight: str) -> None:
    assert _is_weight(weight)
    assert clean_prompt(f"(red fox:{weight}), snow") == "red fox, snow"
    assert clean_prompt(f"((red fox:{weight})), snow") == "red fox, snow"
    # prompt editing takes the same numbers as its `when`
    assert clean_prompt(f"[red fox:white fox:{weight}], snow") == "white fox, snow"
    assert clean_prompt(f"[white fox:{weight}], snow") == "white fox, snow"


@pytest.mark.parametrize("text", NOT_WEIGHTS)
def test_a_tail_that_is_not_a_number_stays_text(text: str) -> None:
    assert not _is_weight(text)
    assert strip_attention(f"(red fox:{text})") == f"red fox:{text}"
    assert strip_attention(f"[red fox:{text}]") == f"red fox:{text}"


def test_only_the_last_part_can_be_a_weight() -> None:
    assert strip_attention("(a:1.5:b)") == "a:1.5:b"
    assert strip_attention("(a:b:1.5)") == "a:b"
    assert strip_attention("(ratio 16:9)") == "ratio 16"  # inside a group a numeric tail is a weight, as in A1111
    assert strip_attention("(ratio 16:9 wide)") == "ratio 16:9 wide"
    assert strip_attention("ratio 16:9") == "ratio 16:9"  # and outside one, always


@pytest.mark.parametrize(("raw", "expected"), [
    ("[from:to:0.5]", "to"),
    ("[from:to:10]", "to"),  # a step number instead of a fraction
    ("[to:0.25]", "to"),
    ("[from::0.5]", ""),  # removed at the end
    ("[:to:0.5]", "to"),
    ("[a|b]", "a"),
    ("[a|b|c]", "a"),
    ("[a|b:0.5]", "a"),  # alternation wins over editing
    ("[a:b:c]", "a:b:c"),  # no number: plain brackets
    ("[a:b:c:0.5]", "a:b:c:0.5"),  # four parts are no editing syntax A1111 knows
    ("[plain]", "plain"),
    ("(plain)", "plain"),
    ("[]", ""),
    ("()", ""),
])
def test_prompt_editing_and_alternation(raw: str, expected: str) -> None:
    assert strip_attention(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("\\(literal\\)", "(literal)"),
    ("\\[literal\\]", "[literal]"),
    ("back\\\\slash", "back\\slash"),
    ("trailing\\", "trailing\\"),
    ("keep \\n and \\:", "keep \\n and \\:"),  # only brackets and backslashes are escapable
    ("(a \\(b\\):1.3)", "a (b)"),
    ("a:b|c", "a:b|c"),  # separators outside any group are text
    ("a ) b ] c", "a  b  c"),  # stray closers go
    ("(a [b:c:0.5] d:1.2)", "a c d"),
    ("[(a:1.2)|b]", "a"),
    ("((a)", "a"),  # unclosed groups end with the text
    ("[a:b:0.5", "b"),
])
def test_escapes_nesting_and_stray_brackets(raw: str, expected: str) -> None:
    assert strip_attention(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("a,,b", "a, b"),
    ("a ,  b", "a, b"),
    ("a\nb", "a, b"),
    ("a\r\nb", "a, b"),
    ("a   b", "a b"),
    ("a\tb", "a b"),
    (" ,;| a |;, ", "a"),
    ("a;b|c", "a;b|c"),
    ("", ""),
])
def test_tidy_separators(raw: str, expected: str) -> None:
    assert tidy_separators(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("<lora:detail:0.7> a cat", "a cat"),
    ("a cat < lora : x >", "a cat"),
    ("<hypernet:anime:1>, a cat", "a cat"),
    ("a <b> cat", "a <b> cat"),  # no `word:`: not an extra network
    ("embedding:bad.pt, a cat", "a cat"),
    ("Embedding:Bad-Hands_5, a cat", "a cat"),
    ("myembedding:x, a cat", "myembedding:x, a cat"),
    ("a BREAK b", "a, b"),
    ("BREAKING, a cat", "BREAKING, a cat"),
    (None, ""),
])
def test_extra_networks_embeddings_and_break(raw: str | None, expected: str) -> None:
    assert clean_prompt(raw) == expected
