"""Prompts embedded in generated images the way real tools write them, and in sidecar files.

Where the tools put them:
- AUTOMATIC1111 / Forge PNG: a `parameters` text chunk (tEXt, or iTXt when not Latin-1) holding the
  "infotext": prompt line(s), `Negative prompt: ...` line(s), and a last `Steps: 20, Sampler: ..., ...` line.
- ComfyUI PNG: `prompt` (API graph) and `workflow` (UI graph) JSON chunks (see `surd.sources.comfyui`).
- InvokeAI PNG `invokeai_metadata` and NovelAI PNG `Comment` JSON chunks.
- A1111 / Forge JPEG and WebP: the infotext in EXIF UserComment (tag 0x9286), prefixed `UNICODE\\0` (UTF-16;
  piexif writes big-endian, other writers use the EXIF byte order: both are read), `ASCII\\0\\0\\0`, or nothing.
- JPEG COM segment: an infotext or a plain prompt.
- Sidecars: `<stem>.json` (`prompt`, `negative_prompt`/`negativePrompt`, other keys into gen_meta) and
  `<stem>.txt` (an infotext or a plain prompt).

Precedence, for the folder source: embedded metadata, then `<stem>.json`, then `<stem>.txt`; the first
with a non-blank prompt wins. Within a PNG: A1111 `parameters`, ComfyUI `prompt`, ComfyUI `workflow`,
InvokeAI, NovelAI, then EXIF. Only chunk and segment headers are read: pixels are never decoded.

`PromptInfo.gen_meta` follows the shared layout of `surd.sources.genmeta`: common names (`model`, `model_hash`,
`sampler`, `scheduler`, `steps`, `cfg`, `seed`, `width`, `height`, `denoise`, `clip_skip`; ComfyUI adds `loras`),
`tool` (a1111, comfyui, invokeai, novelai), and `source_meta`: the fields exactly as the tool wrote them
(for an infotext, every `Key: value` pair, unquoted: `Lora hashes`, `Version`, ...).
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from surd.sources import comfyui
from surd.sources.genmeta import as_float, as_int, clean_text, first

MAX_TEXT_BYTES = 8 << 20  # cap on a decompressed PNG text chunk (zlib bombs)
USER_COMMENT = 0x9286
EXIF_IFD = 0x8769


@dataclass(frozen=True)
class PromptInfo:
    prompt: str
    negative_prompt: str | None = None
    gen_meta: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # where it was found, e.g. "png:parameters", "exif:UserComment", "sidecar:json"


# ---- A1111 infotext --------------------------------------------------------------------------------------

# One `Key: value` pair of the last line; values may be JSON-quoted and then contain commas (as in A1111).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
# A parameters line has at least three pairs including one of these (A1111 always writes `Steps` first);
# this keeps a one-line prompt like "(a:1.2), (b:1.1), (c:0.9)" from being read as parameters.
_PARAM_MARKERS = {"Steps", "Sampler", "CFG scale", "Seed", "Size"}
_NEGATIVE = "Negative prompt:"

# gen_meta name -> the keys tools use for it (A1111 infotext, sidecar JSON, InvokeAI, NovelAI, ComfyUI)
_ALIASES: dict[str, tuple[str, ...]] = {
    "model": ("model", "Model", "model_name", "sd_model_name", "ckpt_name"),
    "model_hash": ("model_hash", "Model hash"),
    "sampler": ("sampler", "Sampler", "sampler_name"),
    "scheduler": ("scheduler", "Schedule type"),
    "steps": ("steps", "Steps"),
    "cfg": ("cfg", "cfg_scale", "CFG scale", "scale", "guidance_scale"),
    "seed": ("seed", "Seed", "noise_seed"),
    "width": ("width",),
    "height": ("height",),
    "denoise": ("denoise", "Denoising strength", "denoising_strength"),
    "clip_skip": ("clip_skip", "Clip skip"),
}
_INTS = {"steps", "seed", "width", "height", "clip_skip"}
_FLOATS = {"cfg", "denoise"}


def normalise_meta(raw: dict[str, Any], tool: str | None = None, *, keep_source: bool = True) -> dict[str, Any]:
    """gen_meta fields under common names (see `surd.sources.genmeta`), plus `source_meta`: `raw` itself."""
    meta: dict[str, Any] = {"tool": tool} if tool else {}
    size = _SIZE.match(raw["Size"]) if isinstance(raw.get("Size"), str) else None
    if size:
        meta["width"], meta["height"] = int(size.group(1)), int(size.group(2))
    for name, keys in _ALIASES.items():
        value = first(raw, *keys)
        if isinstance(value, dict):  # InvokeAI: {"model": {"model_name": ...}}
            value = first(value, "model_name", "name")
        if name in _INTS:
            value = as_int(value)
        elif name in _FLOATS:
            value = as_float(value)
        else:
            value = clean_text(value)
        if value is not None:
            meta[name] = value
    if keep_source:
        meta["source_meta"] = raw
    return meta


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def parse_infotext(text: str) -> PromptInfo | None:
    """Parse A1111/Forge "parameters" text: prompt, `Negative prompt:`, and the last `Key: value, ...` line."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    if lines == [""]:
        return None
    pairs = _PARAM.findall(lines[-1])
    if len(pairs) >= 3 and any(k.strip() in _PARAM_MARKERS for k, _ in pairs):
        lines = lines[:-1]
    else:
        pairs = []
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for line in lines:
        line = line.strip()
        if target is prompt and line.startswith(_NEGATIVE):
            target = negative
            line = line[len(_NEGATIVE):].strip()
        target.append(line)
    raw = {key.strip(): _unquote(value.strip()) for key, value in pairs}
    meta = normalise_meta(raw, "a1111") if raw else {}
    return PromptInfo("\n".join(prompt).strip(), "\n".join(negative).strip() or None, meta, "infotext")


def parse_prompt_text(text: str) -> PromptInfo | None:
    """A sidecar `.txt` or JPEG comment: an infotext when it has one's structure, else a plain prompt."""
    info = parse_infotext(text)
    if info is None:
        return None
    if not info.gen_meta and info.negative_prompt is None:  # no parameters line: a plain prompt
        return PromptInfo(info.prompt, origin="text")
    return info


# ---- JSON (sidecars, InvokeAI, NovelAI) --------------------------------------------------------------------

_PROMPT_KEYS = ("prompt", "positive_prompt", "Prompt")
_NEGATIVE_KEYS = ("negative_prompt", "negativePrompt", "negative", "uc", "Negative prompt")


def parse_prompt_json(obj: Any) -> PromptInfo | None:
    """A JSON object with a prompt key; other keys go into gen_meta. A ComfyUI graph under `prompt` is parsed."""
    if not isinstance(obj, dict):
        return None
    key = next((k for k in _PROMPT_KEYS if k in obj), None)
    if key is None:
        return None
    value = obj[key]
    if isinstance(value, dict):
        return comfy_info(comfyui.parse_api_graph(value), "comfyui:prompt")
    if not isinstance(value, str):
        return None
    neg_key = next((k for k in _NEGATIVE_KEYS if isinstance(obj.get(k), str)), None)
    negative = obj[neg_key].strip() if neg_key else None
    meta = normalise_meta({k: v for k, v in obj.items() if k not in (key, neg_key)})
    return PromptInfo(value.strip(), negative or None, meta, "json")


def _json(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


# ---- containers: PNG chunks, JPEG segments, WebP RIFF chunks ----------------------------------------------


def _inflate(data: bytes) -> bytes | None:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, MAX_TEXT_BYTES)
    except zlib.error:
        return None
    return None if d.unconsumed_tail else out


def _text_chunk(kind: bytes, body: bytes) -> tuple[str, str] | None:
    key, sep, rest = body.partition(b"\0")
    if not sep:
        return None
    name = key.decode("latin-1")
    if kind == b"tEXt":
        raw: bytes | None = rest
    elif kind == b"zTXt":
        raw = _inflate(rest[1:])
    else:  # iTXt: compressed flag, method, language\0, translated keyword\0, UTF-8 text
        if len(rest) < 2:
            return None
        compressed, tail = rest[0], rest[2:]
        parts = tail.split(b"\0", 2)
        if len(parts) < 3:
            return None
        raw = _inflate(parts[2]) if compressed else parts[2]
    if raw is None:
        return None
    try:  # tEXt is Latin-1 by the spec, but some tools write UTF-8 there
        return name, raw.decode("utf-8")
    except UnicodeDecodeError:
        return name, raw.decode("latin-1")


def png_chunks(data: bytes) -> tuple[dict[str, str], bytes | None]:
    """(text chunks by keyword, eXIf bytes) of a PNG, without decoding pixels; tolerant of truncation."""
    texts: dict[str, str] = {}
    exif = None
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) < length or kind == b"IEND":
            break
        pos += 12 + length
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            chunk = _text_chunk(kind, body)
            if chunk is not None:
                texts.setdefault(*chunk)
        elif kind == b"eXIf":
            exif = body
    return texts, exif


def jpeg_segments(data: bytes) -> tuple[bytes | None, list[bytes]]:
    """(EXIF APP1 payload, COM payloads) of a JPEG, reading markers up to the image data."""
    exif, comments = None, []
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
        body = data[pos + 4:pos + 2 + length]
        pos += 2 + length
        if marker == 0xE1 and body.startswith(b"Exif\0\0") and exif is None:
            exif = body
        elif marker == 0xFE:
            comments.append(body)
    return exif, comments


def webp_exif(data: bytes) -> bytes | None:
    """The EXIF chunk of a WebP (RIFF) file."""
    pos = 12
    while pos + 8 <= len(data):
        kind, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if kind == b"EXIF":
            return data[pos + 8:pos + 8 + size]
        pos += 8 + size + (size & 1)
    return None


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
        text = _utf8(body)
    else:
        text = _utf8(raw)
    return text.strip("\0").strip()


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _utf16(body: bytes) -> str:
    if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
        return body.decode("utf-16", "replace")
    body = body[: len(body) // 2 * 2]
    # Mostly-ASCII text has its zero bytes first in big-endian order and second in little-endian order.
    little = body[1::2].count(0) > body[0::2].count(0)
    return body.decode("utf-16-le" if little else "utf-16-be", "replace")


def exif_user_comment(exif: bytes) -> str | None:
    """UserComment text from EXIF bytes (with or without the `Exif\\0\\0` header), or None."""
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        value = parsed.get_ifd(EXIF_IFD).get(USER_COMMENT, parsed.get(USER_COMMENT))
    except Exception:  # malformed EXIF raises many types inside Pillow; it just means "no comment"
        return None
    if not isinstance(value, bytes | str):
        return None
    return decode_user_comment(value) or None


# ---- dispatch ---------------------------------------------------------------------------------------------


def comfy_info(parsed: tuple[str, str | None, dict[str, Any]] | None, origin: str) -> PromptInfo | None:
    """A PromptInfo from `surd.sources.comfyui`'s (prompt, negative, meta), its meta under the common names."""
    if parsed is None:
        return None
    prompt, negative, found = parsed
    meta = normalise_meta(found, "comfyui", keep_source=False)
    if found.get("loras"):
        meta["loras"] = found["loras"]
    return PromptInfo(prompt, negative, meta, origin)


def _relabel(info: PromptInfo, origin: str, tool: str | None = None) -> PromptInfo:
    meta = {"tool": tool, **info.gen_meta} if tool else info.gen_meta
    return PromptInfo(info.prompt, info.negative_prompt, meta, origin)


def _from_png(data: bytes) -> PromptInfo | None:
    texts, exif = png_chunks(data)
    if texts.get("parameters", "").strip():
        info = parse_infotext(texts["parameters"])
        if info is not None and info.prompt:
            return _relabel(info, "png:parameters")
    for key, parse in (("prompt", comfyui.parse_api_graph), ("workflow", comfyui.parse_workflow)):
        info = comfy_info(parse(_json(texts.get(key))), f"comfyui:{key}")
        if info is not None:
            return info
    invoke = parse_prompt_json(_json(texts.get("invokeai_metadata")))
    if invoke is not None and invoke.prompt:
        return _relabel(invoke, "png:invokeai_metadata", tool="invokeai")
    comment = _json(texts.get("Comment"))
    if isinstance(comment, dict) and "uc" in comment:  # NovelAI: prompt in Description, settings in Comment
        comment.setdefault("prompt", texts.get("Description", ""))
        novel = parse_prompt_json(comment)
        if novel is not None and novel.prompt:
            return _relabel(novel, "png:Comment", tool="novelai")
    return _from_exif(exif) if exif else None


def _from_exif(exif: bytes | None) -> PromptInfo | None:
    text = exif_user_comment(exif) if exif else None
    info = parse_infotext(text) if text else None
    if info is None or not info.prompt:
        return None
    return _relabel(info, "exif:UserComment")


def _from_jpeg(data: bytes) -> PromptInfo | None:
    exif, comments = jpeg_segments(data)
    info = _from_exif(exif)
    if info is not None:
        return info
    for comment in comments:
        parsed = parse_prompt_text(_utf8(comment).strip("\0"))
        if parsed is not None and parsed.prompt:
            return _relabel(parsed, "jpeg:comment")
    return None


def read_embedded(data: bytes) -> PromptInfo | None:
    """The prompt embedded in image file bytes (PNG, JPEG, WebP; detected by signature), or None."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            return _from_png(data)
        if data.startswith(b"\xff\xd8"):
            return _from_jpeg(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _from_exif(webp_exif(data))
    except (ValueError, struct.error, RecursionError):  # garbage in a container: treat as "no metadata"
        return None
    return None


def read_sidecar_json(text: str) -> PromptInfo | None:
    info = parse_prompt_json(_json(text))
    if info is None or not info.prompt:
        return None
    return _relabel(info, "sidecar:json")


def read_sidecar_txt(text: str) -> PromptInfo | None:
    info = parse_prompt_text(text)
    if info is None or not info.prompt:
        return None
    return _relabel(info, "sidecar:txt")
