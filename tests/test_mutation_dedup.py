"""What mutation testing found untested in dedup and the perceptual hash: the DCT table, the median rule, the
index's bands and masks, the cost model, and plan_dedup's tie and skip rules."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from surd import phash as phash_mod
from surd.dedup import DedupConfig, Deduplicator, plan_dedup
from surd.errors import StageError
from surd.phash import HASH_BITS, NearIndex, best_band_count, phash
from surd.rows import Drop

# ---- the perceptual hash ----


def test_dct_table_is_built_from_the_dct_ii_formula() -> None:
    # DCT_ROWS is computed once at import; build it again and compare with the formula, coefficient by coefficient
    rows = phash_mod._dct_rows()
    assert rows.dtype == np.int64 and rows.shape == (8, 32)
    for k in range(8):
        for n in range(32):
            assert rows[k, n] == round((1 << 14) * math.cos(math.pi * (2 * n + 1) * k / 64))


def _noise(seed: int, size: tuple[int, int] = (97, 61)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


def _float_phash(image: Image.Image) -> tuple[int, float]:
    """The pHash recipe in floating point: greyscale, Lanczos to 32x32, 2-D DCT-II, 8x8 low block vs its median.

    Also returns how far the nearest coefficient lies from the median, in units of the largest change the
    integer table's rounding makes to any coefficient of this image: above 2, no bit can differ.
    """
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    n = np.arange(32)
    basis = np.array([np.cos(np.pi * (2 * n + 1) * k / 64) for k in range(8)])
    coeffs = (basis @ grey @ basis.T).reshape(-1)
    scaled = phash_mod.DCT_ROWS / (1 << 14)
    rounding = float(np.max(np.abs((scaled @ grey @ scaled.T).reshape(-1) - coeffs)))
    median = float(np.median(coeffs))
    bits = "".join("1" if c > median else "0" for c in coeffs)
    return int(bits, 2), float(np.min(np.abs(coeffs - median))) / rounding


@pytest.mark.parametrize("seed", range(6))
def test_phash_equals_the_floating_point_recipe(seed: int) -> None:
    image = _noise(seed)
    expected, margin = _float_phash(image)
    assert margin > 2
    assert phash(image) == expected
    # no two coefficients tie on noise: "above the median" sets exactly half the bits
    assert phash(image).bit_count() == HASH_BITS // 2


def test_a_flat_image_sets_only_bits_strictly_above_the_median() -> None:
    # A flat image: every coefficient with an odd frequency (48 of 64) is exactly 0 in the integer DCT (the
    # rounded cosines are antisymmetric), so the median is 0; only coefficients strictly above it set a bit.
    h = phash(Image.new("RGB", (40, 40), (120, 120, 120)))
    assert h >> 63 == 1  # the DC term
    assert h.bit_count() <= 16


# ---- the index ----


def test_bands_tile_the_hash_widest_first() -> None:
    assert phash_mod._bands(64, 3) == [(42, 22), (21, 21), (0, 21)]  # 64 = 22 + 21 + 21, from the top bit down
    assert phash_mod._bands(64, 1) == [(0, 64)]
    for count in range(1, 9):
        covered = 0
        for shift, width in phash_mod._bands(64, count):
            band = ((1 << width) - 1) << shift
            assert covered & band == 0
            covered |= band
        assert covered == (1 << 64) - 1


def test_flips_are_every_mask_with_few_bits_fewest_first() -> None:
    assert phash_mod._flips(3, 1) == [0b000, 0b001, 0b010, 0b100]
    assert phash_mod._flips(3, 2) == [0, 1, 2, 4, 3, 5, 6]
    assert phash_mod._flips(4, 0) == [0]


@pytest.mark.parametrize("bit", [0, 31, 32, 63])
def test_one_bit_apart_is_found_on_every_band_edge(bit: int) -> None:
    # radius 1 in two 32-bit bands: one band always matches exactly, whichever bit differs (even a band's edge)
    index = NearIndex(1, bands=2)
    index.add(0)
    assert index.first_within(1 << bit) == 0
    assert index.first_within((1 << bit) | 1 << ((bit + 1) % 64)) is None  # two bits apart


def test_radius_outside_the_hash_is_refused_with_its_range() -> None:
    for radius in (-1, 64):
        with pytest.raises(ValueError, match=rf"^radius must be in \[0, 63\], got {radius}$"):
            NearIndex(radius)
    assert NearIndex(63).radius == 63


def _estimated_work(radius: int, size: int, count: int) -> float:
    """The documented cost of a band count: per band, probes of every value within radius // count bits, each
    probe costing one lookup plus the expected number of hashes in its bucket."""
    base, extra = divmod(64, count)
    total = 0.0
    for band in range(count):
        width = base + (band < extra)
        probes = sum(math.comb(width, k) for k in range(radius // count + 1))
        total += probes * (1 + size / 2**width)
    return total


@pytest.mark.parametrize("size", [10, 1_000, 100_000, 10_000_000])
def test_band_count_is_the_cheapest_of_one_to_eight_bands(size: int) -> None:
    for radius in range(0, 16):
        # more bands than radius + 1 only narrows buckets without saving probes; more than 8 are never worth it
        counts = range(1, min(radius + 1, 8) + 1)
        expected = min(counts, key=lambda c: _estimated_work(radius, size, c))
        assert best_band_count(radius, size) == expected, (radius, size)
    assert best_band_count(0, size) == 1


# ---- plan_dedup and the stage ----


def test_rows_without_a_sha256_are_skipped_not_an_end() -> None:
    drops = plan_dedup(["a", "b", "c"], [None] * 3, [None, "s", "s"], [None] * 3, ["p", "p", "q"], 0)
    assert drops == {("c", None): ("duplicate_image", "b")}


def test_a_row_collected_twice_shares_its_first_copys_fate() -> None:
    # two rows with the same (id, source_id) cannot be told apart: neither is a duplicate of the other
    drops = plan_dedup(["a", "a", "b"], ["x", "x", "y"], ["s", "s", "s"], [None] * 3, ["p", "p", "p"], 0)
    assert drops == {("b", "y"): ("duplicate_pair", "a")}


def test_a_missing_source_id_sorts_before_any_other() -> None:
    # ties on id go by source_id, a missing one counted as "" (before every name, even "A")
    drops = plan_dedup(["a", "a"], ["A", None], ["s", "s"], [None] * 2, ["p", "q"], 0)
    assert drops == {("a", "A"): ("duplicate_image", "a")}


def test_the_stage_plans_without_a_source_id_column_and_refuses_to_run_unplanned() -> None:
    dedup = Deduplicator(DedupConfig(phash_threshold=0))
    with pytest.raises(StageError, match=r"^dedup: plan\(\) must run over the whole input before process_batch\(\)$"):
        dedup.process_batch([{"id": "a"}])
    dedup.plan(pa.table({"id": ["a", "b"], "sha256": ["s", "s"], "phash": pa.array([None, None], pa.uint64()),
                         "keyword_prompt": ["p", "p"]}))
    rows = [{"id": "a", "source_id": None}, {"id": "b", "source_id": None}]
    assert dedup.process_batch(rows) == [rows[0], Drop("duplicate_pair", "a")]
