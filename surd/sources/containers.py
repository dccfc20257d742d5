"""Metadata carriers inside image files, read from chunk and segment headers without decoding pixels.

- PNG: `tEXt` / `zTXt` / `iTXt` text chunks by keyword, and the `eXIf` chunk.
- JPEG: the EXIF APP1 segment and `COM` comment segments, up to the start of the scan.
- WebP (RIFF): the `EXIF` chunk.
- EXIF (TIFF layout): the IFD0 text tags ComfyUI and its save nodes use (ImageDescription, Make, Model) and
  the Exif IFD's UserComment; read by a small bounded parser, not by Pillow.
- A1111 "stealth" metadata: an infotext hidden in the low bits of an RGBA PNG's alpha (or RGB) channels, the
  one case where pixels are decoded (and only up to `MAX_STEALTH_PIXELS`).

Every walk advances at least one header per step and reads nothing past a bound (see `surd.sources.bounds`).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

from surd.sources.bounds import MAX_STEALTH_PIXELS, MAX_TEXT_BYTES, OverBound, inflate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
USER_COMMENT = 0x9286
EXIF_IFD = 0x8769
IMAGE_DESCRIPTION, MAKE, MODEL = 0x010E, 0x010F, 0x0110
EXIF_TEXT_TAGS = {IMAGE_DESCRIPTION: "ImageDescription", MAKE: "Make", MODEL: "Model", USER_COMMENT: "UserComment"}
_MAX_IFD_ENTRIES = 1000


def image_kind(data: bytes) -> str | None:
    """'png', 'jpeg' or 'webp' from the file signature, else None."""
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


@dataclass
class Carriers:
    """What an image file carries: text items by name, its EXIF block, comments, and what was over a bound."""

    texts: dict[str, str] = field(default_factory=dict)
    exif: bytes | None = None
    comments: list[str] = field(default_factory=list)
    too_large: list[str] = field(default_factory=list)  # names of items over MAX_TEXT_BYTES, not read


def _decode(raw: bytes) -> str:
    try:  # tEXt is Latin-1 by the spec, but generators write UTF-8 there
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _text_chunk(kind: bytes, body: bytes) -> tuple[str, str] | None:
    key, sep, rest = body.partition(b"\0")
    if not sep:
        return None
    name = key.decode("latin-1")
    if kind == b"tEXt":
        raw: bytes | None = rest
    elif kind == b"zTXt":
        raw = inflate(rest[1:])
    else:  # iTXt: compressed flag, method, language\0, translated keyword\0, UTF-8 text
        if len(rest) < 2:
            return None
        parts = rest[2:].split(b"\0", 2)
        if len(parts) < 3:
            return None
        raw = inflate(parts[2]) if rest[0] else parts[2]
    return None if raw is None else (name, _decode(raw))


def png_carriers(data: bytes) -> Carriers:
    """Text chunks (the first of each keyword), `eXIf`, and the keywords of chunks over the size bound."""
    found = Carriers()
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IEND":
            break
        body = data[pos + 8:pos + 8 + length]
        if len(body) < length:  # truncated file: keep what came before
            break
        pos += 12 + length
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            name = body[:body.find(b"\0")].decode("latin-1") if b"\0" in body[:80] else "?"
            try:
                if length > MAX_TEXT_BYTES:
                    raise OverBound("metadata_too_large", f"PNG {kind.decode()} chunk {name!r}: {length} bytes")
                chunk = _text_chunk(kind, body)
            except OverBound:
                found.too_large.append(name)
                continue
            if chunk is not None:
                found.texts.setdefault(*chunk)
        elif kind == b"eXIf" and found.exif is None:
            if length > MAX_TEXT_BYTES:
                found.too_large.append("eXIf")
            else:
                found.exif = body
    return found


def jpeg_carriers(data: bytes) -> Carriers:
    """The first EXIF APP1 payload and the COM segments of a JPEG, reading markers up to the image data."""
    found = Carriers()
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image
            break
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if length < 2:
            break
        body = data[pos + 4:pos + 2 + length]
        pos += 2 + length
        if marker == 0xE1 and body.startswith(b"Exif\0\0") and found.exif is None:
            found.exif = body[6:]
        elif marker == 0xFE:
            found.comments.append(_decode(body).strip("\0"))
    return found


def webp_carriers(data: bytes) -> Carriers:
    """The EXIF chunk of a WebP (RIFF) file."""
    found = Carriers()
    pos = 12
    while pos + 8 <= len(data):
        kind, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if kind == b"EXIF":
            if size > MAX_TEXT_BYTES:
                found.too_large.append("EXIF")
            else:
                body = data[pos + 8:pos + 8 + size]
                found.exif = body[6:] if body.startswith(b"Exif\0\0") else body
            break
        pos += 8 + size + (size & 1)
    return found


def carriers(data: bytes) -> Carriers:
    """The metadata carriers of PNG, JPEG or WebP bytes (empty for anything else)."""
    kind = image_kind(data)
    try:
        if kind == "png":
            return png_carriers(data)
        if kind == "jpeg":
            return jpeg_carriers(data)
        if kind == "webp":
            return webp_carriers(data)
    except struct.error:  # a header cut short: nothing more to read
        pass
    return Carriers()


# ---- EXIF ---------------------------------------------------------------------------------------------------


def exif_texts(exif: bytes) -> dict[str, str]:
    """The text tags of `EXIF_TEXT_TAGS` in EXIF bytes (TIFF layout, with or without the `Exif\\0\\0` header)."""
    if exif.startswith(b"Exif\0\0"):
        exif = exif[6:]
    order = {b"II": "<", b"MM": ">"}.get(exif[:2])
    if order is None or len(exif) < 8:
        return {}
    out: dict[str, str] = {}
    try:
        (ifd0,) = struct.unpack(order + "I", exif[4:8])
        entries = _ifd(exif, order, ifd0)
        if EXIF_IFD in entries:
            kind, count, value = entries[EXIF_IFD]
            (sub,) = struct.unpack(order + "I", value[:4])
            entries = {**entries, **_ifd(exif, order, sub)}
    except struct.error:
        return out
    for tag, (kind, _, value) in entries.items():
        name = EXIF_TEXT_TAGS.get(tag)
        if name is None or kind not in (1, 2, 7):
            continue
        text = decode_user_comment(value) if tag == USER_COMMENT else _decode(value).strip("\0").strip()
        if text:
            out[name] = text
    return out


def _ifd(exif: bytes, order: str, offset: int) -> dict[int, tuple[int, int, bytes]]:
    """{tag: (type, count, raw value bytes)} of one IFD; values of byte-sized types only are resolved."""
    (n,) = struct.unpack(order + "H", exif[offset:offset + 2])
    out: dict[int, tuple[int, int, bytes]] = {}
    for i in range(min(n, _MAX_IFD_ENTRIES)):
        entry = exif[offset + 2 + 12 * i:offset + 14 + 12 * i]
        if len(entry) < 12:
            break
        tag, kind, count = struct.unpack(order + "HHI", entry[:8])
        size = count * {1: 1, 2: 1, 3: 2, 4: 4, 7: 1}.get(kind, 0)
        if size <= 4:
            value = entry[8:8 + size] if kind != 4 else entry[8:12]
        else:
            (start,) = struct.unpack(order + "I", entry[8:12])
            value = exif[start:start + size]
        out[tag] = (kind, count, value)
    return out


def decode_user_comment(raw: bytes | str) -> str:
    """Text of an EXIF UserComment: an 8-byte charset prefix (UNICODE, ASCII, JIS, or none) then the text."""
    if isinstance(raw, str):
        return raw.strip("\0").strip()
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        text = _utf16(body)
    elif prefix == b"JIS\0\0\0\0\0":
        text = body.decode("shift_jis", "replace")
    elif prefix in (b"ASCII\0\0\0", b"\0" * 8):
        text = _decode(body)
    else:
        text = _decode(raw)
    return text.strip("\0").strip()


def _utf16(body: bytes) -> str:
    if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
        return body.decode("utf-16", "replace")
    body = body[: len(body) // 2 * 2]
    # Mostly-ASCII text has its zero bytes first in big-endian order and second in little-endian order.
    little = body[1::2].count(0) > body[0::2].count(0)
    return body.decode("utf-16-le" if little else "utf-16-be", "replace")


# ---- A1111 stealth metadata -----------------------------------------------------------------------------------

_STEALTH = {b"stealth_pnginfo": ("alpha", False), b"stealth_pngcomp": ("alpha", True),
            b"stealth_rgbinfo": ("rgb", False), b"stealth_rgbcomp": ("rgb", True)}
_BITS = bytes.maketrans(bytes(range(256)), bytes(b"01"[b & 1] for b in range(256)))


def png_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, colour type) from a PNG's IHDR."""
    if data[12:16] != b"IHDR" or len(data) < 26:
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height, data[25]


def stealth_text(data: bytes) -> str | None:
    """An infotext hidden by A1111's stealth-pnginfo in the low bits of the pixels, or None.

    The bits run column by column (x outer, y inner): a 15-byte signature saying alpha or RGB and plain or
    gzip, a 32-bit length in bits, then the payload.
    """
    size = png_size(data)
    # Only RGBA images are decoded: the extension's default (alpha) mode makes them, and decoding every plain
    # RGB picture in a folder to look for the rare RGB mode would cost more than all the other readers together.
    if size is None or size[2] != 6 or size[0] * size[1] > MAX_STEALTH_PIXELS or 0 in size[:2]:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            columns = im.transpose(Image.Transpose.TRANSPOSE)  # rows of the transpose are the columns
            alpha = columns.getchannel("A").tobytes()
            rgb = columns.convert("RGB").tobytes()
    except (OSError, ValueError, SyntaxError):
        return None
    for plane in (alpha, rgb):
        bits = plane[:120].translate(_BITS)
        if len(bits) < 120:
            continue
        signature = int(bits, 2).to_bytes(15, "big")
        if signature not in _STEALTH or (_STEALTH[signature][0] == "alpha") != (plane is alpha):
            continue
        n = int(plane[120:152].translate(_BITS) or b"0", 2)
        if n % 8 or n // 8 > MAX_TEXT_BYTES:
            raise OverBound("metadata_too_large", f"stealth metadata of {n // 8} bytes")
        payload_bits = plane[152:152 + n].translate(_BITS)
        if len(payload_bits) < n:
            return None
        payload = int(payload_bits, 2).to_bytes(n // 8, "big") if n else b""
        if _STEALTH[signature][1]:
            payload = inflate(payload, wbits=16 + 15) or b""
        return _decode(payload)
    return None
