"""What mutation testing found untested in the clean stage: drop details, separators, embedding names, bombs."""

from __future__ import annotations

import io

from PIL import Image
from test_clean import _huge_png_header as _png_header  # a PNG declaring a size it does not hold

from surd.clean import CleanConfig, clean_prompt, embeddings_pattern, tidy_separators
from surd.rows import Drop


def _png(width: int = 80, height: int = 80) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def _clean(row: dict, **config: object) -> dict | Drop:
    return CleanConfig(**config).build().process_row({"id": "t:1", **row})


def test_drop_details_name_what_failed() -> None:
    long_raw = _clean({"keyword_prompt_raw": "a" * 30, "image": {"bytes": _png()}}, max_raw_chars=20)
    assert long_raw.detail == "raw prompt 30 chars > max_raw_chars 20"
    empty = _clean({"keyword_prompt_raw": "<lora:x:1>", "image": {"bytes": _png()}})
    assert (empty.reason, empty.detail) == ("empty_prompt", "")
    no_image = _clean({"keyword_prompt_raw": "a lighthouse at dusk", "image": {"bytes": None, "path": "x.png"}})
    assert (no_image.reason, no_image.detail) == ("no_image", "no image bytes (path='x.png')")
    assert no_image.row["keyword_prompt"] == "a lighthouse at dusk"  # the dropped row keeps its cleaned prompt
    missing = _clean({"keyword_prompt_raw": "a lighthouse at dusk"})
    assert missing.detail == "no image bytes (path=None)"
    garbage = _clean({"keyword_prompt_raw": "a lighthouse at dusk", "image": {"bytes": b"not an image"}})
    assert garbage.reason == "undecodable_image" and garbage.detail.startswith("UnidentifiedImageError: ")


def test_pillow_bombs_are_named_with_their_size() -> None:
    # Over twice Pillow's limit, Pillow itself refuses the image; between once and twice it only warns, and the
    # stage's own limit (the same number by default) decides.
    huge = _clean({"keyword_prompt_raw": "a lighthouse at dusk", "image": {"bytes": _png_header(60_000, 60_000)}})
    assert huge.reason == "decompression_bomb" and "3600000000 pixels" in huge.detail
    warned = _clean({"keyword_prompt_raw": "a lighthouse at dusk", "image": {"bytes": _png_header(10_000, 10_000)}})
    assert (warned.reason, warned.detail) == ("decompression_bomb", "10000x10000 > max_pixels 89478485")


def test_separators_carriage_returns_and_letters_at_the_ends() -> None:
    assert tidy_separators("a\rb") == "a, b"  # an old-Mac line break is a line break too
    assert tidy_separators("a \r b") == "a, b"
    assert tidy_separators("X marks the spot X") == "X marks the spot X"  # only separators are stripped


def test_embedding_names_match_any_case_and_the_longest_name_first() -> None:
    assert clean_prompt("EasyNegative, a cat", embeddings_pattern(["easynegative"])) == "a cat"
    # A name that is a prefix of another, ending where a lookahead cannot tell (a dot): the longer one must win,
    # whatever the case and the order the names were configured in.
    for names in (["bad", "BAD.v2"], ["BAD.v2", "bad"], ["Bad", "bad.V2"]):
        assert clean_prompt("bad.v2, a cat", embeddings_pattern(names)) == "a cat", names
    assert embeddings_pattern([]) is None
