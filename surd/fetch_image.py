"""Validate downloaded bytes as an image: identify, check the pixel count before decoding, decode fully,
optionally shrink and re-encode. Used by the fetch stage; pure (bytes in, result out)."""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# Formats we can write back unchanged when only resizing; anything else is re-encoded as PNG.
WRITABLE = {"JPEG", "PNG", "WEBP"}


@dataclass(frozen=True)
class DecodedImage:
    data: bytes
    image_format: str
    width: int
    height: int
    sha256: str


@dataclass(frozen=True)
class ImageProblem:
    reason: str  # not_an_image, corrupt_image, decompression_bomb
    detail: str


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    resize_max_side: int | None = None,
    image_format: str | None = None,
    quality: int = 95,
) -> DecodedImage | ImageProblem:
    """Check and (if asked) transform one image; never raises on bad input."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:  # checked before decoding a single pixel
                    return ImageProblem("decompression_bomb", f"{width}x{height} exceeds {max_pixels} pixels")
                img.load()
                fmt = img.format or "UNKNOWN"
                if _needs_rewrite(img, fmt, resize_max_side, image_format):
                    data, fmt, width, height = _rewrite(img, fmt, resize_max_side, image_format, quality)
    except Image.DecompressionBombError as e:
        return ImageProblem("decompression_bomb", str(e))
    except UnidentifiedImageError:
        return ImageProblem("not_an_image", f"unrecognised data starting {data[:16]!r}")
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError) as e:
        return ImageProblem("corrupt_image", f"{type(e).__name__}: {e}")
    return DecodedImage(data, fmt, width, height, hashlib.sha256(data).hexdigest())


def _needs_rewrite(img: Image.Image, fmt: str, max_side: int | None, target: str | None) -> bool:
    too_big = max_side is not None and max(img.size) > max_side
    return too_big or (target is not None and target != fmt)


def _rewrite(
    img: Image.Image, fmt: str, max_side: int | None, target: str | None, quality: int
) -> tuple[bytes, str, int, int]:
    out_format = target or (fmt if fmt in WRITABLE else "PNG")
    if max_side is not None and max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if out_format == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")  # JPEG has no alpha or palette
    elif img.mode not in ("RGB", "RGBA", "L", "LA"):
        img = img.convert("RGBA" if "transparency" in img.info or img.mode.endswith("A") else "RGB")
    buf = io.BytesIO()
    img.save(buf, format=out_format, **({"quality": quality} if out_format in ("JPEG", "WEBP") else {}))
    return buf.getvalue(), out_format, img.width, img.height
