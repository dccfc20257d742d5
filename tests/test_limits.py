"""Every threshold and cap at its limit, one below and one above (an off-by-one in any of them fails here).

Clean's lengths, word counts, image side, pixels and raw length; dedup's pHash distance; the nsfw threshold; the
score thresholds; the source readers' bounds; fetch's byte, pixel and retry caps live in test_limits_fetch.py.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from pipelines.export import ExportConfig
from surd.clean import CleanConfig
from surd.dedup import DedupConfig, plan_dedup
from surd.nsfw import NsfwConfig
from surd.rows import Drop
from surd.score import ScoreConfig
from surd.sources import bounds, infotext, localfiles
from surd.sources.bounds import OverBound


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buf, "PNG")
    return buf.getvalue()


IMAGE = _png(80, 80)


def _clean(prompt: str, data: bytes = IMAGE, negative: str | None = None, **config: object) -> dict | Drop:
    row = {"id": "t:1", "image": {"bytes": data, "path": None}, "keyword_prompt_raw": prompt,
           "negative_prompt": negative}
    return CleanConfig(**config).build().process_row(row)


def _reason(result: dict | Drop) -> str:
    return result.reason if isinstance(result, Drop) else "kept"


def _words(n: int) -> str:
    return " ".join(["cat"] * n)


# ---- clean ----


@pytest.mark.parametrize(("length", "expected"), [(9, "prompt_too_short"), (10, "kept"), (11, "kept")])
def test_min_chars(length: int, expected: str) -> None:
    assert _reason(_clean("x" * length, min_chars=10)) == expected


@pytest.mark.parametrize(("length", "expected"), [(29, "kept"), (30, "kept"), (31, "prompt_too_long")])
def test_max_chars(length: int, expected: str) -> None:
    assert _reason(_clean("y" * length, min_chars=1, max_chars=30)) == expected


def test_min_chars_equal_to_max_chars_keeps_exactly_that_length() -> None:
    assert [_reason(_clean("z" * n, min_chars=5, max_chars=5)) for n in (4, 5, 6)] == [
        "prompt_too_short", "kept", "prompt_too_long"]
    CleanConfig(min_chars=5, max_chars=5)  # equal bounds are a valid config
    with pytest.raises(ValidationError, match="min_chars"):
        CleanConfig(min_chars=6, max_chars=5)


@pytest.mark.parametrize(("words", "expected"), [(3, "prompt_too_short"), (4, "kept"), (5, "kept")])
def test_min_words(words: int, expected: str) -> None:
    result = _clean(_words(words), min_chars=1, min_words=4)
    assert _reason(result) == expected
    if expected != "kept":
        assert result.detail == f"{words} words < min_words 4"


@pytest.mark.parametrize(("words", "expected"), [(5, "kept"), (6, "kept"), (7, "prompt_too_long")])
def test_max_words(words: int, expected: str) -> None:
    result = _clean(_words(words), min_chars=1, max_words=6)
    assert _reason(result) == expected
    if expected != "kept":
        assert result.detail == f"{words} words > max_words 6"


def test_word_bounds_are_optional_and_validated() -> None:
    assert _reason(_clean(_words(500), min_chars=1, max_chars=5000)) == "kept"  # no word bounds by default
    assert _reason(_clean("cat", min_chars=1)) == "kept"
    CleanConfig(min_words=3, max_words=3)
    with pytest.raises(ValidationError, match="min_words"):
        CleanConfig(min_words=4, max_words=3)
    with pytest.raises(ValidationError):
        CleanConfig(max_words=0)
    CleanConfig(min_words=0, min_chars=0)


def test_length_details_name_both_numbers() -> None:
    short = _clean("abc", min_chars=4)
    assert short.detail == "3 chars < min_chars 4"
    long = _clean("abcdef", min_chars=1, max_chars=5)
    assert long.detail == "6 chars > max_chars 5"


@pytest.mark.parametrize(("side", "expected"), [(63, "image_too_small"), (64, "kept"), (65, "kept")])
def test_min_side(side: int, expected: str) -> None:
    wide = _clean("a lighthouse at dusk", _png(200, side), min_side=64)
    tall = _clean("a lighthouse at dusk", _png(side, 200), min_side=64)
    assert (_reason(wide), _reason(tall)) == (expected, expected)
    if expected != "kept":
        assert wide.detail == f"200x{side} < min_side 64"
        assert wide.row["width"] == 200 and wide.row["height"] == side  # measured before the drop


@pytest.mark.parametrize(("pixels", "expected"), [(80 * 80 - 1, "decompression_bomb"), (80 * 80, "kept"),
                                                  (80 * 80 + 1, "kept")])
def test_max_pixels(pixels: int, expected: str) -> None:
    result = _clean("a lighthouse at dusk", max_pixels=pixels, min_side=1)
    assert _reason(result) == expected
    if expected != "kept":
        assert result.detail == f"80x80 > max_pixels {pixels}"


@pytest.mark.parametrize(("extra", "expected"), [(-1, "kept"), (0, "kept"), (1, "prompt_too_long")])
def test_max_raw_chars_on_the_prompt_and_the_negative(extra: int, expected: str) -> None:
    limit = 40
    raw = "(" * (limit + extra - 20) + "a lighthouse at dusk"  # raw length counts the syntax, not the clean text
    assert len(raw) == limit + extra
    assert _reason(_clean(raw, max_raw_chars=limit)) == expected
    negative = _clean("a lighthouse at dusk", negative="b" * (limit + extra), max_raw_chars=limit)
    assert _reason(negative) == expected
    if expected != "kept":
        assert negative.detail == f"negative prompt {limit + 1} chars > max_raw_chars {limit}"


# ---- dedup ----


def _near_pair(distance: int, threshold: int) -> dict:
    base = 0b1011_0110 << 40
    other = base ^ ((1 << distance) - 1)  # flips the `distance` lowest bits
    return plan_dedup(["a", "b"], [None, None], ["sha-a", "sha-b"], [base, other], ["p", "q"], threshold)


@pytest.mark.parametrize(("distance", "dropped"), [(5, True), (6, True), (7, False)])
def test_phash_threshold(distance: int, dropped: bool) -> None:
    drops = _near_pair(distance, threshold=6)
    assert drops == ({("b", None): ("near_duplicate_image", "a")} if dropped else {})


def test_phash_threshold_zero_disables_and_the_config_bounds() -> None:
    assert _near_pair(0, threshold=0) == {}  # identical hashes, different bytes: not near-duplicates at 0
    assert _near_pair(1, threshold=1) == {("b", None): ("near_duplicate_image", "a")}
    assert DedupConfig(phash_threshold=0).phash_threshold == 0
    assert DedupConfig(phash_threshold=32).phash_threshold == 32
    for bad in (-1, 33):
        with pytest.raises(ValidationError):
            DedupConfig(phash_threshold=bad)


# ---- nsfw and score thresholds (the decision alone: the models are tested in test_nsfw.py / test_clip.py) ----


@pytest.mark.parametrize(("score", "dropped"), [(0.7999, False), (0.8, True), (0.8001, True)])
def test_nsfw_threshold_drops_at_or_above(score: float, dropped: bool) -> None:
    scorer = NsfwConfig(threshold=0.8).build()
    result = scorer._decide({"id": "x"}, score)
    assert isinstance(result, Drop) == dropped
    if dropped:
        assert result.reason == "nsfw" and result.row["nsfw_score"] == score
    else:
        assert result == {"id": "x", "nsfw_score": score}
    flagger = NsfwConfig(threshold=0.8, mode="flag").build()
    assert flagger._decide({"id": "x"}, score) == {"id": "x", "nsfw_score": score}
    assert flagger.counters["flagged"] == int(dropped)


def test_nsfw_threshold_bounds() -> None:
    NsfwConfig(threshold=0)
    NsfwConfig(threshold=1)
    for bad in (-0.01, 1.01):
        with pytest.raises(ValidationError):
            NsfwConfig(threshold=bad)


def _judge(narrative: float | None, keyword: float | None = None, cutoff: float | None = None,
           **config: object) -> str:
    scorer = ScoreConfig(**config).build()
    scorer._cutoff = cutoff  # what plan() fixes from the run's scores
    problem = scorer._judge({"clip_narrative": narrative, "clip_keyword": keyword})
    return "kept" if problem is None else problem[0]


@pytest.mark.parametrize(("narrative", "expected"), [(0.1999, "narrative_mismatch"), (0.2, "kept"), (0.2001, "kept")])
def test_min_narrative(narrative: float, expected: str) -> None:
    assert _judge(narrative, min_narrative=0.2) == expected


@pytest.mark.parametrize(("narrative", "expected"), [(0.2499, "narrative_below_percentile"), (0.25, "kept"),
                                                     (0.2501, "kept")])
def test_percentile_cutoff(narrative: float, expected: str) -> None:
    assert _judge(narrative, cutoff=0.25, min_narrative_percentile=10) == expected


@pytest.mark.parametrize(("keyword", "expected"), [(0.3749, "kept"), (0.375, "kept"),
                                                   (0.3751, "narrative_below_keyword")])
def test_max_keyword_gap(keyword: float, expected: str) -> None:
    # clip_keyword - clip_narrative against the gap; binary fractions, so the gap at the limit is exactly 0.125
    assert 0.375 - 0.25 == 0.125
    assert _judge(0.25, keyword, max_keyword_gap=0.125) == expected


def test_no_narrative_is_never_judged_and_score_bounds() -> None:
    assert _judge(None, 0.9, min_narrative=0.5, max_keyword_gap=0.0) == "kept"
    assert _judge(0.2, None, max_keyword_gap=0.0) == "kept"  # no keyword score: no gap to measure
    for ok in ({"min_narrative": -1}, {"min_narrative": 1}, {"max_keyword_gap": 0},
               {"min_narrative_percentile": 0.01}, {"min_narrative_percentile": 99.99}):
        ScoreConfig(**ok)
    for bad in ({"min_narrative": -1.01}, {"min_narrative": 1.01}, {"max_keyword_gap": -0.01},
                {"min_narrative_percentile": 0}, {"min_narrative_percentile": 100}):
        with pytest.raises(ValidationError):
            ScoreConfig(**bad)


# ---- export ----


def test_export_test_fraction_bounds() -> None:
    assert ExportConfig(test_fraction=0.0).test_fraction == 0.0
    assert ExportConfig(test_fraction=0.999).test_fraction == 0.999
    for bad in (-0.001, 1.0, 1.5):
        with pytest.raises(ValidationError):
            ExportConfig(test_fraction=bad)


# ---- source readers' bounds (surd/sources/bounds.py) ----


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(("depth", "ok"), [(63, True), (64, True), (65, False)])
def test_max_json_depth(depth: int, ok: bool) -> None:
    assert bounds.MAX_JSON_DEPTH == 64
    assert bounds.json_depth(json.loads(_nested(depth))) == depth
    if ok:
        assert bounds.load_json(_nested(depth), "doc") is not None
    else:
        with pytest.raises(OverBound, match="deeper than 64") as e:
            bounds.load_json(_nested(depth), "doc")
        assert e.value.reason == "json_too_deep" and e.value.detail.startswith("doc: ")


def test_json_depth_of_every_shape() -> None:
    assert [bounds.json_depth(v) for v in (1, "s", None, [], {}, [[]], {"a": {"b": [1]}}, [1, [2, [3]], {}])] == [
        0, 0, 0, 1, 1, 2, 3, 3]


@pytest.mark.parametrize(("extra", "ok"), [(-1, True), (0, True), (1, False)])
def test_max_text_bytes_of_a_json_document(extra: int, ok: bool) -> None:
    size = bounds.MAX_TEXT_BYTES + extra
    text = '"' + "a" * (size - 2) + '"'
    assert len(text) == size
    if ok:
        assert len(bounds.load_json(text, "doc")) == size - 2
    else:
        with pytest.raises(OverBound) as e:
            bounds.load_json(text, "doc")
        assert e.value.reason == "metadata_too_large" and str(size) in e.value.detail


def test_not_json_is_not_an_over_bound() -> None:
    with pytest.raises(bounds.NotJson):
        bounds.load_json("{not json", "doc")


@pytest.mark.parametrize(("extra", "ok"), [(-1, True), (0, True), (1, False)])
def test_inflate_limit(extra: int, ok: bool) -> None:
    limit = 1000
    data = zlib.compress(b"z" * (limit + extra))
    if ok:
        assert bounds.inflate(data, limit) == b"z" * (limit + extra)
    else:
        with pytest.raises(OverBound, match=f"past {limit} bytes"):
            bounds.inflate(data, limit)
    assert bounds.inflate(b"not zlib at all", limit) is None


def test_inflate_default_limit_is_max_text_bytes() -> None:
    exact = zlib.compress(b"\0" * bounds.MAX_TEXT_BYTES)
    assert len(bounds.inflate(exact)) == bounds.MAX_TEXT_BYTES
    with pytest.raises(OverBound):
        bounds.inflate(zlib.compress(b"\0" * (bounds.MAX_TEXT_BYTES + 1)))


@pytest.mark.parametrize(("extra", "ok"), [(-1, True), (0, True), (1, False)])
def test_read_regular_limit(tmp_path: Path, extra: int, ok: bool) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"q" * (100 + extra))
    if ok:
        assert bounds.read_regular(path, 100) == b"q" * (100 + extra)
    else:
        with pytest.raises(OverBound, match=r"101 bytes \(limit 100\)") as e:
            bounds.read_regular(path, 100)
        assert e.value.reason == "file_too_large"


def test_read_regular_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OverBound) as e:
        bounds.read_regular(fifo, 100)
    assert e.value.reason == "not_a_regular_file"


@pytest.mark.parametrize(("extra", "ok"), [(-1, True), (0, True), (1, False)])
def test_max_line_bytes_of_json_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: int, ok: bool) -> None:
    monkeypatch.setattr(localfiles, "MAX_LINE_BYTES", 64)  # the same rule as 16 MiB, on a line one can read
    record = json.dumps({"prompt": "p" * (64 + extra - 15)}).encode()  # `{"prompt": ""}` and "\n": 15 bytes
    line = record + b"\n"
    assert len(line) == 64 + extra  # the newline counts
    path = tmp_path / "rows.jsonl"
    path.write_bytes(line + b'{"prompt": "next"}\n')
    parts = localfiles.line_partitions(path, "rows.jsonl", 10)
    assert parts == [{"file": "rows.jsonl", "offset": 0, "line": 1, "lines": 2}]
    lines = list(localfiles.read_lines(path, parts[0]))
    assert lines[1] == (2, '{"prompt": "next"}')  # the next line is read whole, wherever the long one ended
    if ok:
        assert lines[0] == (1, record.decode())
    else:
        assert lines[0] == (1, None)
        with pytest.raises(OverBound, match="a line over 64 bytes"):
            localfiles.json_line(lines[0][1], "rows.jsonl:1")


@pytest.mark.parametrize(("extra", "parsed"), [(-1, True), (0, True), (1, False)])
def test_max_params_line(monkeypatch: pytest.MonkeyPatch, extra: int, parsed: bool) -> None:
    line = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1"
    monkeypatch.setattr(infotext, "MAX_PARAMS_LINE", len(line) - extra)
    settings = infotext.parse_settings(line)
    if parsed:
        assert settings is not None and settings["Steps"] == "20" and settings["Seed"] == "1"
    else:
        assert settings is None  # a longer last line is prompt text
