"""Clean stage (prompt syntax, filters, image columns), perceptual hash, and dedup stage."""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import random
import struct
import zlib

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from pydantic import ValidationError

from surd import phash as phash_mod
from surd.clean import CleanConfig, clean_prompt, embeddings_pattern
from surd.dedup import DedupConfig, plan_dedup
from surd.errors import StageError
from surd.phash import NearIndex, best_band_count, hamming, phash
from surd.rows import Drop
from surd.schema import from_rows

PROMPT = "a lighthouse on a cliff at sunset, dramatic clouds, oil painting"


def picture(seed: int, size: tuple[int, int] = (256, 192)) -> Image.Image:
    """A seeded picture: a colour gradient with random shapes (structure a perceptual hash can see)."""
    rng = random.Random(seed)
    w, h = size
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = (x0, y0, x0 + rng.randrange(w // 10, w // 2), y0 + rng.randrange(h // 10, h // 2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def row(id_: str, data: bytes | None, prompt: str = PROMPT, **extra: object) -> dict:
    return {"id": id_, "source": "test", "source_id": id_, "image": {"bytes": data, "path": None},
            "keyword_prompt_raw": prompt, **extra}  # fmt: skip


def clean(rows: list[dict], **config: object) -> list[dict | Drop]:
    return CleanConfig(**config).build().process_batch(rows)


EMB = embeddings_pattern(["easynegative", "bad-hands-5", "ng_deepnegative_v1_75t"])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "masterpiece, best quality, (1girl:1.2), ((red dress)), [blurry], (((detailed eyes))), solo",
            "masterpiece, best quality, 1girl, red dress, blurry, detailed eyes, solo",
        ),
        (
            "((masterpiece, (best quality:1.3))), portrait of a knight <lora:add_detail:0.7> <hypernet:anime:1>, "
            "<lyco:Gothic_armor:0.8> armor BREAK castle background",
            "masterpiece, best quality, portrait of a knight, armor, castle background",
        ),
        ("photo of \\(cat\\) by \\[artist\\], (sharp focus:1.1)", "photo of (cat) by [artist], sharp focus"),
        (
            "[dog:cat:0.4] in a field, [sunny day:0.3], [hat::0.5] [red|blue|green] eyes",
            "cat in a field, sunny day, red eyes",
        ),
        ("easynegative, (bad-hands-5:1.2), ng_deepnegative_v1_75t, lowres,, , blurry  ,", "lowres, blurry"),
        ("embedding:EasyNegative.pt, worst quality,\n\nugly", "worst quality, ugly"),
        (" , ;landscape,   mountains ,|", "landscape, mountains"),
        ("((unclosed group, trees", "unclosed group, trees"),
        ("stray ] closer ) here", "stray closer here"),
        ("(subject: a cat), ratio 16:9, (clock at 12:30:0.9)", "subject: a cat, ratio 16:9, clock at 12:30"),
        ("easynegativeX and my_easynegative stay", "easynegativeX and my_easynegative stay"),
    ],
)
def test_clean_prompt(raw: str, expected: str) -> None:
    assert clean_prompt(raw, EMB) == expected


def test_break_only_as_keyword() -> None:
    assert clean_prompt("breakfast BREAK Breaking waves", None) == "breakfast, Breaking waves"


def test_cleaner_keeps_raw_cleans_negative_and_keeps_narrative() -> None:
    data = encode(picture(1))
    raw = "(masterpiece:1.2), " + PROMPT + " <lora:x:1>"
    [out] = clean([row("t:1", data, raw, negative_prompt="(easynegative:1.3), (worst quality:1.4), lowres",
                       narrative_prompt="A lighthouse at sunset.")])  # fmt: skip
    assert isinstance(out, dict)
    assert out["keyword_prompt_raw"] == raw
    assert out["keyword_prompt"] == "masterpiece, " + PROMPT
    assert out["negative_prompt"] == "worst quality, lowres"
    assert out["narrative_prompt"] == "A lighthouse at sunset."


def test_cleaner_fills_image_columns() -> None:
    data = encode(picture(2, (200, 120)), "JPEG", quality=90)
    [out] = clean([row("t:2", data)])
    assert isinstance(out, dict)
    assert (out["width"], out["height"], out["image_format"]) == (200, 120, "JPEG")
    assert out["sha256"] == hashlib.sha256(data).hexdigest()
    assert 0 <= out["phash"] < 2**64
    # The stage fills the raw prompt from keyword_prompt when a source gave only that.
    [out2] = clean([{"id": "t:3", "image": {"bytes": data, "path": None}, "keyword_prompt": "(a red fox:1.1), snow"}])
    assert out2["keyword_prompt_raw"] == "(a red fox:1.1), snow" and out2["keyword_prompt"] == "a red fox, snow"


def _huge_png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )


def test_every_clean_drop_reason() -> None:
    good = encode(picture(3))
    truncated = good[: len(good) // 2]
    rows = [
        row("d:empty", good, "<lora:foo:0.8>, BREAK, (easynegative:1.2), ((  ))"),
        row("d:short", good, "a cat"),
        row("d:long", good, "cat, " * 300),
        row("d:noimage", None),
        row("d:garbage", b"this is not an image at all"),
        row("d:truncated", truncated),
        row("d:small", encode(picture(4, (300, 40)))),
        row("d:bomb", _huge_png_header(60_000, 60_000)),
        row("d:ok", good),
    ]
    results = dict(zip([r["id"] for r in rows], clean(rows), strict=True))
    reasons = {k: (v.reason if isinstance(v, Drop) else "kept") for k, v in results.items()}
    assert reasons == {
        "d:empty": "empty_prompt",
        "d:short": "prompt_too_short",
        "d:long": "prompt_too_long",
        "d:noimage": "no_image",
        "d:garbage": "undecodable_image",
        "d:truncated": "undecodable_image",
        "d:small": "image_too_small",
        "d:bomb": "decompression_bomb",
        "d:ok": "kept",
    }
    assert "300x40" in results["d:small"].detail
    assert "1498 chars" in results["d:long"].detail  # 300 x "cat, " less the trailing ", "
    # The recorded row carries the cleaned prompt and the raw one.
    assert results["d:empty"].row["keyword_prompt"] == "" and results["d:empty"].row["keyword_prompt_raw"]


def test_configured_limits() -> None:
    good = encode(picture(5))
    rows = [row("a", good, "one two three four five six"), row("b", good, "a b c d e f g h i j k l m n o p")]
    out = clean(rows, min_words=7, max_words=12)
    assert [r.reason for r in out] == ["prompt_too_short", "prompt_too_long"]
    [small] = clean([row("c", good)], min_side=300)  # picture is 256x192
    assert small.reason == "image_too_small"
    [bomb] = clean([row("d", good)], max_pixels=256 * 192 - 1)
    assert bomb.reason == "decompression_bomb" and "max_pixels" in bomb.detail
    assert isinstance(clean([row("e", good)], max_pixels=256 * 192)[0], dict)
    [kept] = clean([row("f", good, "easynegative, a quiet harbour")], embeddings=[])
    assert kept["keyword_prompt"] == "easynegative, a quiet harbour"


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="min_chars"):
        CleanConfig(min_chars=50, max_chars=20)
    with pytest.raises(ValidationError, match="max_char"):
        CleanConfig(max_char=5)
    with pytest.raises(ValidationError):
        DedupConfig(phash_threshold=-1)


def test_processors_pickle_before_setup() -> None:
    cleaner = pickle.loads(pickle.dumps(CleanConfig().build()))
    assert isinstance(cleaner.process_batch([row("p", encode(picture(6)))])[0], dict)


# ---- perceptual hash ----


def test_dct_constants_are_far_from_rounding_ties() -> None:
    # Platform-stable only if no libm ulp difference can flip a rounding: every value is >= 1e-6 from .5
    for k in range(8):
        for n in range(32):
            v = (1 << 14) * math.cos(math.pi * (2 * n + 1) * k / 64)
            assert abs(abs(v - math.floor(v)) - 0.5) > 1e-6
            assert phash_mod.DCT_ROWS[k, n] == round(v)


def test_phash_stable_and_discriminating() -> None:
    img = picture(10)
    h = phash(img)
    assert h == phash(picture(10)) == phash(Image.open(io.BytesIO(encode(img))))
    jpeg = Image.open(io.BytesIO(encode(img, "JPEG", quality=60)))
    resized = img.resize((243, 182), Image.Resampling.BICUBIC)
    assert hamming(h, phash(jpeg)) <= 4
    assert hamming(h, phash(resized)) <= 4
    for seed in range(11, 16):
        assert hamming(h, phash(picture(seed))) > 12


def _brute_first_within(hashes: list[int], value: int, radius: int) -> int | None:
    return next((i for i, h in enumerate(hashes) if hamming(h, value) <= radius), None)


def _clustered_hashes(rng: random.Random, n: int, centres: int = 4, max_flips: int = 10) -> list[int]:
    bases = [rng.getrandbits(64) for _ in range(centres)]
    out = []
    for _ in range(n):
        h = rng.choice(bases)
        for bit in rng.sample(range(64), rng.randrange(max_flips + 1)):
            h ^= 1 << bit
        out.append(h)
    return out


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32), radius=st.integers(0, 16), bands=st.integers(1, 9), n=st.integers(0, 60))
def test_near_index_matches_brute_force(seed: int, radius: int, bands: int, n: int) -> None:
    assume(radius // bands <= 2)  # keeps the probe count of the test small; the maths is the same
    rng = random.Random(seed)
    hashes = _clustered_hashes(rng, n)
    index = NearIndex(radius, bands=bands)
    added: list[int] = []
    for h in hashes:
        assert index.first_within(h) == _brute_first_within(added, h, radius)
        if rng.random() < 0.6:
            index.add(h)
            added.append(h)


def test_band_count_grows_bands_wider_with_size() -> None:
    # a small index wants many narrow bands (exact probes), a large one fewer, wider bands
    assert best_band_count(6, 1_000) == 7
    assert best_band_count(6, 10_000_000) < best_band_count(6, 100_000) < 7


# ---- dedup ----


def brute_force_dedup(ids, shas, hashes, prompts, threshold):  # noqa: ANN001, ANN201
    """Reference: O(n^2) over rows in id order, comparing with every kept row."""
    kept: list[int] = []
    drops = {}
    for i in sorted(range(len(ids)), key=lambda i: ids[i]):
        same = [k for k in kept if shas[k] == shas[i]]
        if same:
            reason = "duplicate_pair" if prompts[same[0]] == prompts[i] else "duplicate_image"
            drops[ids[i]] = (reason, ids[same[0]])
            continue
        if threshold > 0:
            near = [k for k in kept if hamming(hashes[k], hashes[i]) <= threshold]
            if near:
                drops[ids[i]] = ("near_duplicate_image", ids[near[0]])
                continue
        kept.append(i)
    return drops


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), threshold=st.integers(0, 12), n=st.integers(0, 80))
def test_plan_matches_brute_force(seed: int, threshold: int, n: int) -> None:
    rng = random.Random(seed)
    ids = rng.sample([f"r:{i:04d}" for i in range(1000)], n)
    shas = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n)]
    hashes = _clustered_hashes(rng, n, centres=3, max_flips=14)
    prompts = [rng.choice(["p1", "p2", None]) for _ in range(n)]
    got = plan_dedup(ids, ids, shas, hashes, prompts, threshold)
    assert {k[0]: v for k, v in got.items()} == brute_force_dedup(ids, shas, hashes, prompts, threshold)


def _dedup(cleaned: list[dict], **config: object) -> dict[str, str]:
    dedup = DedupConfig(**config).build()
    dedup.plan(from_rows(cleaned).select(list(dedup.plan_columns)))  # what the executor reads
    dedup = pickle.loads(pickle.dumps(dedup))  # the executor ships the planned processor to workers
    out = dedup.process_batch(cleaned)
    return {
        r["id"]: (f"{o.reason}:{o.detail}" if isinstance(o, Drop) else "kept")
        for r, o in zip(cleaned, out, strict=True)
    }


def test_every_dedup_reason_on_real_images() -> None:
    original = picture(20)
    png = encode(original)
    rows = [
        row("img:e-different", encode(picture(21))),
        row("img:b-pair", png),  # same bytes, same prompt
        row("img:d-jpeg", encode(original, "JPEG", quality=70), "the same picture re-encoded, other words"),
        row("img:a-first", png),
        row("img:c-image", png, "the same picture with a different prompt"),
        row("img:f-resized", encode(original.resize((250, 188), Image.Resampling.LANCZOS))),
    ]
    cleaned = clean(rows)
    assert all(isinstance(r, dict) for r in cleaned)
    assert _dedup(cleaned) == {
        "img:a-first": "kept",
        "img:b-pair": "duplicate_pair:img:a-first",
        "img:c-image": "duplicate_image:img:a-first",
        "img:d-jpeg": "near_duplicate_image:img:a-first",
        "img:e-different": "kept",
        "img:f-resized": "near_duplicate_image:img:a-first",
    }
    # threshold 0 turns near-duplicate detection off; exact duplicates are still found
    off = _dedup(cleaned, phash_threshold=0)
    assert off["img:d-jpeg"] == off["img:f-resized"] == "kept"
    assert off["img:b-pair"] == "duplicate_pair:img:a-first"


def test_dedup_keeps_unhashed_rows_and_needs_a_plan() -> None:
    rows = [{"id": "x:1", "sha256": None, "phash": None}, {"id": "x:2", "sha256": None, "phash": None}]
    assert _dedup(rows) == {"x:1": "kept", "x:2": "kept"}
    with pytest.raises(StageError, match="plan"):
        DedupConfig().build().process_batch(rows)


def test_rows_sharing_an_id_are_told_apart_by_source_id() -> None:
    a = {"id": "folder:abc", "source_id": "a.png", "sha256": "s", "phash": 1, "keyword_prompt": "p"}
    b = dict(a, source_id="copy/a.png")
    columns = [[r[c] for r in (b, a)] for c in ("id", "source_id", "sha256", "phash", "keyword_prompt")]
    assert plan_dedup(*columns, threshold=6) == {("folder:abc", "copy/a.png"): ("duplicate_pair", "folder:abc")}


def test_clean_then_dedup_through_the_local_executor(tmp_path) -> None:  # noqa: ANN001
    from pipelines.local import run_stage
    from surd.schema import DROPPED_SCHEMA
    from surd.shards import commit_shard, read_stage_table, write_manifest

    original = picture(30)
    rows = [row("f:b", encode(original)), row("f:a", encode(original, "JPEG", quality=80)), row("f:c", b"junk")]
    rows += [row("f:d", encode(picture(31)), "tiny"), row("f:e", encode(picture(32)))]
    run = tmp_path / "run"
    for part in range(2):  # two shards: dedup must decide across shards
        chunk = rows[part::2]
        stats = {"in": len(chunk), "kept": len(chunk), "dropped": {}, "seconds": 0.0}
        commit_shard(run / "collect", f"t/part-{part:05d}", from_rows(chunk), DROPPED_SCHEMA.empty_table(), stats)
    write_manifest(run / "collect", "collect")
    clean_stats = run_stage(run, "clean", CleanConfig(), progress=False)
    assert clean_stats["dropped"] == {"undecodable_image": 1, "prompt_too_short": 1}
    dedup_stats = run_stage(run, "dedup", DedupConfig(), progress=False)
    assert dedup_stats["dropped"] == {"near_duplicate_image": 1}
    assert sorted(read_stage_table(run / "dedup", ["id"]).column("id").to_pylist()) == ["f:a", "f:e"]
