"""A 64-bit DCT perceptual hash that is exact on every platform, and a fast Hamming-radius index.

The hash follows the classic pHash recipe (as `imagehash.phash`): greyscale, resize to 32x32, 2-D
DCT-II, keep the 8x8 lowest frequencies, one bit per coefficient: above the median or not.
The difference: the DCT runs in integer arithmetic (cosines scaled by 2**14 and rounded), so the
result does not depend on the BLAS, libm or CPU that computes it; the median test is done on
integers too. Bits are in row-major order, the first coefficient in the most significant bit.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
from PIL import Image

HASH_BITS = 64
_SIDE = 32  # resized image side
_LOW = 8  # low-frequency block side: 8 x 8 = 64 bits
_SCALE = 1 << 14


def _dct_rows() -> np.ndarray:
    """The first `_LOW` rows of the unnormalised 32-point DCT-II matrix, scaled and rounded to int64."""
    rows = [
        [round(_SCALE * math.cos(math.pi * (2 * n + 1) * k / (2 * _SIDE))) for n in range(_SIDE)] for k in range(_LOW)
    ]
    return np.array(rows, dtype=np.int64)


DCT_ROWS = _dct_rows()


def phash(image: Image.Image) -> int:
    """The 64-bit perceptual hash of a decoded image, as an unsigned int (fits Arrow uint64)."""
    grey = image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.int64)
    # |coefficient| <= 2**14 * 2**14 * 32 * 32 * 255 < 2**46: exact in int64.
    coeffs = (DCT_ROWS @ pixels @ DCT_ROWS.T).reshape(-1)
    ordered = np.sort(coeffs)
    twice_median = int(ordered[HASH_BITS // 2 - 1]) + int(ordered[HASH_BITS // 2])
    value = 0
    for c in coeffs.tolist():
        value = (value << 1) | (2 * c > twice_median)
    return value


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _bands(bits: int, count: int) -> list[tuple[int, int]]:
    """(shift, width) of `count` contiguous bands covering `bits` bits, widths differing by at most one."""
    widths = [bits // count + (1 if i < bits % count else 0) for i in range(count)]
    out, shift = [], bits
    for width in widths:
        shift -= width
        out.append((shift, width))
    return out


def _flips(width: int, radius: int) -> list[int]:
    """Every `width`-bit mask with at most `radius` bits set, fewest bits first."""
    return [sum(1 << b for b in combo) for k in range(radius + 1) for combo in combinations(range(width), k)]


def best_band_count(radius: int, expected_size: int) -> int:
    """The band count with the least estimated work per query: bucket probes plus candidate comparisons."""

    def cost(count: int) -> float:
        total = 0.0
        for _, width in _bands(HASH_BITS, count):
            probes = sum(math.comb(width, k) for k in range(radius // count + 1))
            total += probes * (1 + expected_size / 2**width)
        return total

    return min(range(1, min(radius + 1, 8) + 1), key=cost)


class NearIndex:
    """Hashes added so far, queried for the earliest one within a Hamming radius.

    Multi-index hashing: split the 64 bits into `bands` bands; two hashes within `radius` bits differ
    in at most `radius // bands` bits on at least one band (pigeonhole), so a query probes, per band,
    the buckets of every band value that close to its own and compares only the hashes found there.
    """

    def __init__(self, radius: int, expected_size: int = 1_000_000, bands: int | None = None) -> None:
        if not 0 <= radius < HASH_BITS:
            raise ValueError(f"radius must be in [0, {HASH_BITS - 1}], got {radius}")
        self.radius = radius
        count = bands or best_band_count(radius, expected_size)
        self._bands = [
            (shift, (1 << width) - 1, _flips(width, radius // count)) for shift, width in _bands(HASH_BITS, count)
        ]
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._bands]
        self._hashes: list[int] = []

    def __len__(self) -> int:
        return len(self._hashes)

    def add(self, value: int) -> int:
        """Add a hash; returns its position (positions increase in insertion order)."""
        pos = len(self._hashes)
        self._hashes.append(value)
        for (shift, mask, _), table in zip(self._bands, self._tables, strict=True):
            table.setdefault((value >> shift) & mask, []).append(pos)
        return pos

    def first_within(self, value: int) -> int | None:
        """Position of the earliest added hash within `radius` bits of `value`, or None."""
        best: int | None = None
        hashes, radius = self._hashes, self.radius
        for (shift, mask, flips), table in zip(self._bands, self._tables, strict=True):
            key = (value >> shift) & mask
            for flip in flips:
                for pos in table.get(key ^ flip, ()):
                    if best is not None and pos >= best:
                        break  # each bucket is in insertion order: nothing earlier follows
                    if (hashes[pos] ^ value).bit_count() <= radius:
                        best = pos
                        break
        return best
