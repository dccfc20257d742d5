"""The A1111 "infotext" and the one `gen_meta` layout every generator's settings are mapped onto.

An infotext (A1111, Forge, reForge, SD.Next, Stability Matrix, Civitai, ComfyUI save nodes) is prompt line(s),
`Negative prompt: ...` line(s), and a last line of `Key: value` pairs (values JSON-quoted when they hold
commas; Civitai writes bare JSON arrays and objects). The settings line is read by a linear scan, and only
when it is at most `MAX_PARAMS_LINE` long: a longer last line is prompt text.

`normalise_meta` maps any generator's settings onto the common names of `surd.sources.genmeta` (`model`,
`model_hash`, `sampler`, `scheduler`, `steps`, `cfg`, `seed`, `width`, `height`, `denoise`, `clip_skip`),
matching keys case-insensitively and ignoring spaces, `_` and `-` (`CFG Scale`, `cfg_scale`, `cfgScale`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from surd.sources.bounds import MAX_PARAMS_LINE
from surd.sources.genmeta import as_float, as_int, clean_text
from surd.sources.readings import PromptInfo

NEGATIVE = "Negative prompt:"
_NEGATIVE_LINE = re.compile(r"^[ \t]*Negative prompt:", re.MULTILINE)
_KEY = re.compile(r"\w[\w \-/]+")
_TOKENS = re.compile(r'[",\[\]{}\\]')
# A settings line has at least three pairs, one of them one of these (A1111 always writes `Steps` first).
_MARKERS = {"steps", "sampler", "cfgscale", "seed", "size"}
_MARKER_SEARCH = re.compile(r"\b(?:steps|sampler|cfg scale|seed|size)\s*:", re.IGNORECASE)
_SIZE = re.compile(r"^\s*\(?\s*(\d{1,6})\s*[x×*,]\s*(\d{1,6})\s*\)?")

# gen_meta name -> the (normalised) keys generators use for it, first match wins
_ALIASES: dict[str, tuple[str, ...]] = {
    "model": ("model", "modelname", "sdmodelname", "ckptname", "unetname", "basemodelname"),
    "model_hash": ("modelhash", "basemodelhash"),
    "sampler": ("sampler", "samplername", "ksamplername"),
    "scheduler": ("scheduler", "scheduletype", "schedule", "noiseschedule"),
    "steps": ("steps", "numinferencesteps"),
    "cfg": ("cfg", "cfgscale", "scale", "guidancescale"),
    "seed": ("seed", "noiseseed"),
    "width": ("width",),
    "height": ("height",),
    "denoise": ("denoise", "denoisingstrength"),
    "clip_skip": ("clipskip",),
}
_SIZES = ("size", "resolution", "dimensions")
_INTS = {"steps", "seed", "width", "height", "clip_skip"}
_FLOATS = {"cfg", "denoise"}


def key_of(name: Any) -> str:
    """A key as compared across generators: lower case, without spaces, `_` and `-`."""
    return re.sub(r"[\s_\-]", "", str(name)).lower()


def parse_size(value: Any) -> tuple[int, int] | None:
    """(width, height) from "512x768", "1024 x 1024", "(768, 1280)" or "1216 x 832   (landscape)"."""
    if not isinstance(value, str):
        return None
    match = _SIZE.match(value[:64])
    return (int(match.group(1)), int(match.group(2))) if match else None


def normalise_meta(raw: dict[str, Any], tool: str | None = None, *, keep_source: bool = True) -> dict[str, Any]:
    """gen_meta fields under common names (see `surd.sources.genmeta`), plus `source_meta`: `raw` itself."""
    meta: dict[str, Any] = {"tool": tool} if tool else {}
    by_key: dict[str, Any] = {}
    for key, value in raw.items():
        by_key.setdefault(key_of(key), value)
    size = next((s for k in _SIZES if (s := parse_size(by_key.get(k))) is not None), None)
    if size:
        meta["width"], meta["height"] = size
    for name, keys in _ALIASES.items():
        value = next((by_key[k] for k in keys if by_key.get(k) is not None), None)
        if isinstance(value, dict):  # InvokeAI, TensorArt: {"model": {"model_name": ...}}
            value = next((value[k] for k in ("model_name", "name", "modelFileName") if value.get(k)), None)
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


# ---- the settings line -----------------------------------------------------------------------------------


def _items(line: str) -> list[str]:
    """The line split at commas outside quotes and JSON brackets, in one pass over its structural characters."""
    items: list[str] = []
    start, depth, quoted, escaped = 0, 0, False, -1
    for match in _TOKENS.finditer(line):
        char, at = match.group(), match.start()
        if quoted:
            if char == "\\" and escaped != at - 1:
                escaped = at
            elif char == '"' and escaped != at - 1:
                quoted = False
        elif char == '"':
            quoted = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            items.append(line[start:at])
            start = at + 1
    items.append(line[start:])
    return items


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def parse_settings(line: str) -> dict[str, str] | None:
    """The `Key: value` pairs of an A1111 settings line, or None when the line is not one."""
    if len(line) > MAX_PARAMS_LINE or not _MARKER_SEARCH.search(line):
        return None
    pairs: dict[str, str] = {}
    last: str | None = None
    for item in _items(line):
        key, sep, value = item.partition(":")
        key = key.strip()
        if sep and _KEY.fullmatch(key) and key not in pairs:
            pairs[key] = value.strip()
            last = key
        elif last is not None and item.strip():  # a comma the writer forgot to quote
            pairs[last] += "," + item
    if len(pairs) < 3 or not any(key_of(k) in _MARKERS for k in pairs):
        return None
    return {key: _unquote(value.strip()) for key, value in pairs.items()}


# ---- the infotext --------------------------------------------------------------------------------------------


def _lines(text: str) -> str:
    return "\n".join(line.strip() for line in text.split("\n")).strip()


def parse_infotext(text: str) -> PromptInfo | None:
    """Parse A1111/Forge "parameters" text: prompt, `Negative prompt:`, and the last `Key: value, ...` line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        return None
    head, _, last = text.rpartition("\n")
    raw = parse_settings(last)
    body = head if raw is not None else text
    negative: str | None = None
    match = _NEGATIVE_LINE.search(body) if "Negative prompt:" in body else None  # a substring test is far faster
    if match:
        body, negative = body[:match.start()], _lines(body[match.end():]) or None
    meta = normalise_meta(raw, "a1111") if raw else {}
    return PromptInfo(_lines(body), negative, meta, "infotext", "a1111")


def parse_prompt_text(text: str) -> PromptInfo | None:
    """A sidecar `.txt` or a comment: an infotext when it has one's structure, else a plain prompt."""
    info = parse_infotext(text)
    if info is None:
        return None
    if not info.gen_meta and info.negative_prompt is None:  # no settings line: a plain prompt
        return PromptInfo(info.prompt, origin="text", reader="text")
    return info


def has_settings(info: PromptInfo) -> bool:
    """Whether an infotext carried generation settings or a negative prompt (not just free text)."""
    return bool(info.gen_meta) or info.negative_prompt is not None
