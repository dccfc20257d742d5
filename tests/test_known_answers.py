"""Known answers: the split of fixed ids worked out by hand, its proportion, and the source parsers' output pinned.

The split rule (surd/schema.py, docs): take sha256 of the id, read its first 8 bytes as a big-endian integer h;
the row is `test` when h / 2**64 < test_fraction. The digests below come from `printf %s ID | sha256sum`.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.export import ExportRows
from surd.rows import Drop
from surd.schema import split_for
from surd.sources import civitai, genmeta, infotext, lexica

# id -> first 8 bytes of its sha256, as printed by sha256sum
DIGESTS = {
    "civitai:1": "e20b42612c4a5023",  # h / 2**64 = 0.8830
    "civitai:2": "472e6d6e2facf33e",  # 0.2781
    "civitai:3": "31c268a29c90f672",  # 0.1944
    "folder:a.png": "78535283903d8c7b",  # 0.4700
    "demo:1": "2913c693cc5ec951",  # 0.1605
    "demo:3": "2f13cec703a2be5a",  # 0.1839
}


@pytest.mark.parametrize(("fraction", "tests"), [
    (0.0, set()),
    (0.05, set()),
    (0.17, {"demo:1"}),
    (0.19, {"demo:1", "demo:3"}),
    (0.2, {"demo:1", "demo:3", "civitai:3"}),
    (0.3, {"demo:1", "demo:3", "civitai:3", "civitai:2"}),
    (0.5, {"demo:1", "demo:3", "civitai:3", "civitai:2", "folder:a.png"}),
    (0.9, set(DIGESTS)),
])
def test_split_of_fixed_ids(fraction: float, tests: set[str]) -> None:
    got = {i for i in DIGESTS if split_for(i, fraction) == "test"}
    assert got == tests
    assert all(split_for(i, fraction) == "train" for i in DIGESTS if i not in tests)


def test_split_at_the_exact_boundary_is_train() -> None:
    # `<`, not `<=`: an id whose h / 2**64 equals the fraction stays in train; a hair above it moves to test.
    at = int(DIGESTS["civitai:3"], 16) / 2**64
    assert split_for("civitai:3", at) == "train"
    assert split_for("civitai:3", math.nextafter(at, 1.0)) == "test"


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5])
def test_split_proportion_over_many_ids(fraction: float) -> None:
    n = 20_000
    tests = sum(split_for(f"source:{i}", fraction) == "test" for i in range(n))
    sd = math.sqrt(n * fraction * (1 - fraction))
    assert abs(tests - n * fraction) < 5 * sd  # a fair hash: within five standard deviations of n * fraction


def test_split_is_nested_as_the_fraction_grows() -> None:
    ids = [f"source:{i}" for i in range(2000)]
    small = {i for i in ids if split_for(i, 0.1) == "test"}
    large = {i for i in ids if split_for(i, 0.3) == "test"}
    assert small < large  # growing the test split only moves rows from train to test


def test_export_rows_set_the_split_and_count_it() -> None:
    rows = [{"id": i} for i in DIGESTS]
    export = ExportRows(0.2)
    export.setup()
    out = export.process_batch(rows)
    assert {r["id"]: r["split"] for r in out} == {
        i: ("test" if i in {"demo:1", "demo:3", "civitai:3"} else "train") for i in DIGESTS}
    assert export.counters == {"rows_test": 3, "rows_train": 3}
    export.process_batch([{"id": "civitai:2"}])
    assert export.counters == {"rows_test": 3, "rows_train": 4}


class _RejectFirst:
    """A review processor in miniature (the real one is tested in test_review_rules.py)."""

    counters = {"review_rejected": 1}

    def setup(self) -> None:
        self.ready = True

    def process_batch(self, rows: list[dict]) -> list[dict | Drop]:
        return [Drop("review_rejected", "other"), *rows[1:]]


def test_export_rows_apply_reviews_first_and_merge_their_counters() -> None:
    reviews = _RejectFirst()
    export = ExportRows(0.5, reviews)
    export.setup()
    assert reviews.ready
    out = export.process_batch([{"id": "civitai:1"}, {"id": "folder:a.png"}, {"id": "civitai:1"}])
    assert isinstance(out[0], Drop) and [r["split"] for r in out[1:]] == ["test", "train"]
    assert export.counters == {"rows_test": 1, "rows_train": 1, "review_rejected": 1}


# ---- Civitai ----


FLAT_META = {"prompt": "a lighthouse, (storm:1.2)", "negativePrompt": "blurry", "seed": 1234, "steps": 30,
             "cfgScale": 6.5, "sampler": "DPM++ 2M Karras", "Model": "dreamshaper_8", "baseModel": "SD 1.5",
             "Size": "512x768"}
ITEM = {"id": 101, "url": "https://image.civitai.com/x/101.jpeg", "width": 512, "height": 768, "nsfwLevel": "None",
        "browsingLevel": 1, "createdAt": "2024-05-01T10:00:00.000Z", "postId": 77, "username": "painter",
        "baseModel": "SDXL 1.0", "type": "image", "meta": FLAT_META}


def test_civitai_item_to_row_known_answer() -> None:
    row = civitai.item_to_row(ITEM)
    assert isinstance(row, dict)
    gen_meta = json.loads(row.pop("gen_meta"))
    assert row == {
        "id": "civitai:101", "source": "civitai", "source_id": "101",
        "source_url": "https://civitai.com/images/101", "image_url": "https://image.civitai.com/x/101.jpeg",
        "keyword_prompt_raw": "a lighthouse, (storm:1.2)", "keyword_prompt": "a lighthouse, (storm:1.2)",
        "negative_prompt": "blurry",
    }
    assert gen_meta == {
        "model": "dreamshaper_8", "base_model": "SD 1.5", "sampler": "DPM++ 2M Karras", "steps": 30, "cfg": 6.5,
        "seed": 1234, "width": 512, "height": 768, "nsfw_level": "None", "browsing_level": 1,
        "username": "painter", "created_at": "2024-05-01T10:00:00.000Z", "post_id": 77, "source_meta": FLAT_META,
    }


def test_civitai_base_model_falls_back_to_the_item_and_drops_say_why() -> None:
    row = civitai.item_to_row({**ITEM, "meta": {"prompt": "p"}})
    assert json.loads(row["gen_meta"])["base_model"] == "SDXL 1.0"
    video = civitai.item_to_row({**ITEM, "type": "video"})
    assert isinstance(video, Drop) and (video.reason, video.detail) == ("not_an_image", "media type 'video'")
    no_url = civitai.item_to_row({**ITEM, "url": "ftp://x/y.png"})
    assert (no_url.reason, no_url.detail) == ("no_image_url", "url 'ftp://x/y.png'")
    no_meta = civitai.item_to_row({**ITEM, "meta": None})
    assert (no_meta.reason, no_meta.detail) == ("no_prompt", "no meta")
    no_prompt = civitai.item_to_row({**ITEM, "meta": {"seed": 1}})
    assert (no_prompt.reason, no_prompt.detail) == ("no_prompt", "meta has no prompt")
    assert no_prompt.row["id"] == "civitai:101"
    for bad in ({"url": "https://x/y.png"}, {**ITEM, "id": True}, {**ITEM, "id": " "}, [1, 2]):
        dropped = civitai.item_to_row(bad)
        assert isinstance(dropped, Drop) and dropped.reason == "malformed_item"
        assert dropped.row["id"].startswith("civitai:malformed-") and dropped.row["source"] == "civitai"
    assert civitai.item_to_row({**ITEM, "id": "abc"})["id"] == "civitai:abc"


@pytest.mark.parametrize(("meta", "expected"), [
    (FLAT_META, FLAT_META),
    ({"id": 5, "meta": FLAT_META}, FLAT_META),
    ({"id": 5, "meta": {"id": 6, "meta": FLAT_META}}, FLAT_META),
    ({"prompt": "flat", "meta": {"prompt": "inner"}}, {"prompt": "flat", "meta": {"prompt": "inner"}}),
    ({"prompt": None, "meta": {"seed": 1}}, {"prompt": None, "meta": {"seed": 1}}),  # a prompt key: flat
    ({"seed": 3, "meta": "text"}, {"seed": 3, "meta": "text"}),  # a non-dict `meta` value: flat
    ({"id": 5, "meta": None}, {}),
    ({"id": 5}, {"id": 5}),
    ("text", {}),
    (None, {}),
])
def test_civitai_unwrap_meta_shapes(meta: object, expected: dict) -> None:
    assert civitai.unwrap_meta(meta) == expected


def test_civitai_parse_meta_reads_every_alias() -> None:
    parsed = civitai.parse_meta({"prompt": " p ", "negative_prompt": "n", "Seed": "7", "Steps": 20.0,
                                 "cfg_scale": "5.5", "Sampler": "Euler", "model": {"title": "m"},
                                 "base_model": "SD 1.5"})
    assert (parsed.prompt, parsed.negative_prompt, parsed.seed, parsed.steps, parsed.cfg, parsed.sampler,
            parsed.model, parsed.base_model) == (" p ", "n", 7, 20, 5.5, "Euler", "m", "SD 1.5")
    other = civitai.parse_meta({"prompt": "p", "Negative prompt": "neg", "CFG scale": 4, "cfg": 9,
                                "sampler_name": "DDIM", "modelName": 1.5})
    assert (other.negative_prompt, other.cfg, other.sampler, other.model) == ("neg", 4.0, "DDIM", "1.5")
    assert civitai.parse_meta({"prompt": "p", "cfg": 9, "Model": True}).cfg == 9.0
    assert civitai.parse_meta({"prompt": "p", "Model": True}).model is None


prompts = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())
extra_keys = st.dictionaries(st.sampled_from(["seed", "steps", "cfgScale", "sampler", "Model", "meta", "id"]),
                             st.one_of(st.none(), st.integers(), st.text(max_size=8),
                                       st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)),
                             max_size=5)


@settings(max_examples=150, deadline=None)
@given(prompt=prompts, extra=extra_keys, wraps=st.integers(0, 3))
def test_a_meta_prompt_survives_whatever_sits_beside_it_and_however_it_is_wrapped(prompt: str, extra: dict,
                                                                                  wraps: int) -> None:
    meta: object = {**extra, "prompt": prompt}
    for level in range(wraps):
        meta = {"id": level, "meta": meta}
    parsed = civitai.parse_meta(meta)
    assert parsed.prompt == genmeta.safe_str(prompt)
    row = civitai.item_to_row({"id": 9, "url": "https://image.civitai.com/9.png", "meta": meta})
    assert isinstance(row, dict) and row["keyword_prompt_raw"] == genmeta.safe_str(prompt)


# ---- Lexica ----


def test_lexica_item_to_row_known_answer() -> None:
    item = {"id": "0a1b", "prompt": "cyberpunk city, neon", "src": "https://image.lexica.art/full/0a1b",
            "gallery": "https://lexica.art/prompt/p1", "model": "lexica-aperture-v2", "guidance": 7,
            "seed": "4242", "width": 768, "height": 512, "grid": False, "nsfw": True, "promptid": "p1",
            "negativePrompt": "text"}
    row = lexica.item_to_row(item)
    assert isinstance(row, dict)
    gen_meta = json.loads(row.pop("gen_meta"))
    assert row == {"id": "lexica:0a1b", "source": "lexica", "source_id": "0a1b",
                   "source_url": "https://lexica.art/prompt/p1", "image_url": "https://image.lexica.art/full/0a1b",
                   "keyword_prompt_raw": "cyberpunk city, neon", "keyword_prompt": "cyberpunk city, neon",
                   "negative_prompt": "text"}
    assert gen_meta == {"model": "lexica-aperture-v2", "base_model": None, "sampler": None, "steps": None,
                        "cfg": 7.0, "seed": 4242, "width": 768, "height": 512, "grid": False, "nsfw": True,
                        "prompt_id": "p1", "source_meta": item}
    plain = lexica.item_to_row({"id": 12, "prompt": "p", "src": "https://x/y", "grid": "no"})
    assert plain["source_url"] == "https://lexica.art/prompt/12" and json.loads(plain["gen_meta"])["grid"] is None
    assert lexica.item_to_row({"id": 12, "src": "https://x/y"}).reason == "no_prompt"
    assert lexica.item_to_row({"id": 12, "prompt": "p", "src": "data:x"}).detail == "src 'data:x'"
    for bad in ({"prompt": "p"}, {"id": False}, {"id": 1.5}, "x"):
        assert lexica.item_to_row(bad).reason == "malformed_item"


# ---- A1111 infotext ----


def test_infotext_known_answer() -> None:
    text = ("masterpiece, (a red fox:1.2)\nin the snow\nNegative prompt: blurry,\n  lowres\n"
            'Steps: 28, Sampler: DPM++ 2M, CFG scale: 6.5, Seed: 99, Size: 512x768, Model: v1-5, '
            'Lora hashes: "a: 1, b: 2", Denoising strength: 0.4, Clip skip: 2')
    info = infotext.parse_infotext(text)
    assert info.prompt == "masterpiece, (a red fox:1.2)\nin the snow"
    assert info.negative_prompt == "blurry,\nlowres"
    assert (info.origin, info.reader) == ("infotext", "a1111")
    meta = dict(info.gen_meta)
    source = meta.pop("source_meta")
    assert meta == {"tool": "a1111", "width": 512, "height": 768, "model": "v1-5", "sampler": "DPM++ 2M",
                    "steps": 28, "cfg": 6.5, "seed": 99, "denoise": 0.4, "clip_skip": 2}
    assert source["Lora hashes"] == "a: 1, b: 2"  # a quoted value keeps its commas
    assert infotext.has_settings(info)


def test_infotext_without_settings_is_a_plain_prompt() -> None:
    info = infotext.parse_prompt_text("a cat on a mat\nsecond line")
    assert (info.prompt, info.negative_prompt, info.gen_meta, info.origin) == (
        "a cat on a mat\nsecond line", None, {}, "text")
    assert infotext.parse_infotext("   ") is None
    negative_only = infotext.parse_prompt_text("a cat\nNegative prompt: dogs")
    assert (negative_only.prompt, negative_only.negative_prompt) == ("a cat", "dogs")
    assert infotext.has_settings(negative_only)


@pytest.mark.parametrize(("value", "size"), [("512x768", (512, 768)), ("1024 x 1024", (1024, 1024)),
                                             ("(768, 1280)", (768, 1280)), ("1216 x 832   (landscape)", (1216, 832)),
                                             ("big", None), (512, None)])
def test_parse_size(value: object, size: tuple[int, int] | None) -> None:
    assert infotext.parse_size(value) == size


@pytest.mark.parametrize(("value", "as_int", "as_float"), [
    (7, 7, 7.0), ("7", 7, 7.0), (" -3 ", -3, -3.0), (7.0, 7, 7.0), (7.5, None, 7.5), ("7.5", None, 7.5),
    (True, None, None), (None, None, None), ("nan", None, None), (float("inf"), None, None), ([7], None, None),
    (2**128 - 1, 2**128 - 1, float(2**128 - 1)), (2**128, None, float(2**128)),
])
def test_genmeta_number_readers(value: object, as_int: int | None, as_float: float | None) -> None:
    assert genmeta.as_int(value) == as_int
    assert genmeta.as_float(value) == as_float
