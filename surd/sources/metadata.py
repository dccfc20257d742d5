"""Prompts embedded in generated images the way real tools write them, and in sidecar files.

Where the tools put them (the readers, in the order they are tried; the first prompt found wins):

- PNG `parameters` text chunk: an A1111-family infotext (A1111, Forge, reForge, SD.Next, Stability Matrix,
  ComfyUI save nodes), or a JSON document (SwarmUI, Fooocus, RuinedFooocus, HF Spaces: see
  `surd.sources.layouts`). A save node's placeholder infotext (prompt `unknown`, `Version: ComfyUI`) is no prompt.
- PNG `prompt` (ComfyUI API graph; TensorArt adds `generation_data`), else `workflow` (UI graph): see
  `surd.sources.comfyui`.
- PNG `invokeai_metadata` (InvokeAI 3+), `sd-metadata` / `Dream` (InvokeAI 2), NovelAI `Comment` + `Description`,
  Stability Matrix `parameters-json`.
- EXIF (PNG `eXIf`, JPEG APP1, WebP `EXIF`): UserComment holding an infotext or a JSON document (SwarmUI,
  NovelAI, ComfyUI SaveImagePlus, Civitai); ImageDescription / Make / Model holding `prompt:` / `workflow:`
  graphs (ComfyUI's WebP writer, save-image-extended).
- JPEG `COM` segments: an infotext or a JSON document.
- A1111 "stealth" metadata in a PNG's pixels, when nothing else is there.
- Sidecars: `<stem>.json` (any layout above; a flat `prompt` / `negative_prompt` object) and `<stem>.txt`
  (an infotext or a plain prompt: a sidecar says outright that its text is the prompt).

A comment without generation settings (JPEG `COM`, PNG `Comment`, EXIF UserComment or ImageDescription: an
editor's note such as "re-saved in GIMP") is a prompt only when asked for (`bare_comments`). Every reader is
bounded (`surd.sources.bounds`); over a bound the answer is a `NoPrompt` with the bound's reason.

`PromptInfo.gen_meta` follows the shared layout of `surd.sources.genmeta`: common names (`model`, `model_hash`,
`sampler`, `scheduler`, `steps`, `cfg`, `seed`, `width`, `height`, `denoise`, `clip_skip`; ComfyUI adds `loras`),
`tool` (a1111, comfyui, swarmui, fooocus, novelai, invokeai, ...), and `source_meta`: the fields exactly as the
tool wrote them.
"""

from __future__ import annotations

import re
import struct

from surd.sources import containers, layouts
from surd.sources.bounds import MAX_TEXT_BYTES, NotJson, OverBound, load_json
from surd.sources.containers import decode_user_comment, exif_texts, stealth_text
from surd.sources.infotext import has_settings, normalise_meta, parse_infotext, parse_prompt_text
from surd.sources.readings import NoPrompt, PromptInfo, Reading, relabel

__all__ = ["MAX_TEXT_BYTES", "NoPrompt", "PromptInfo", "Reading", "decide", "decode_user_comment", "examine",
           "exif_user_comment", "normalise_meta", "parse_infotext", "parse_prompt_json", "parse_prompt_text",
           "png_chunks", "read_embedded", "read_image", "read_sidecar", "read_sidecar_json", "read_sidecar_txt"]

# PNG text keywords generators write; one of them over the size bound drops the image
_KNOWN_KEYWORDS = {"parameters", "prompt", "workflow", "invokeai_metadata", "sd-metadata", "Dream", "Comment",
                   "Description", "generation_data", "parameters-json"}
_COMFY_TAG = re.compile(r"\s*(prompt|workflow)\s*:\s*", re.IGNORECASE)
_PLACEHOLDER = "unknown"


def png_chunks(data: bytes) -> tuple[dict[str, str], bytes | None]:
    """(text chunks by keyword, eXIf bytes) of a PNG, without decoding pixels; chunks over the bound left out."""
    found = containers.png_carriers(data)
    return found.texts, found.exif


def exif_user_comment(exif: bytes) -> str | None:
    """UserComment text from EXIF bytes (with or without the `Exif\\0\\0` header), or None."""
    return exif_texts(exif).get("UserComment")


# ---- one text, read as what it is -------------------------------------------------------------------------------


def _placeholder(info: PromptInfo) -> bool:
    version = str(info.gen_meta.get("source_meta", {}).get("Version", ""))
    return info.prompt.strip().lower() == _PLACEHOLDER and "comfyui" in version.lower()


def _text(text: str, origin: str, *, bare_comments: bool | None) -> Reading | None:
    """A metadata text: a JSON document by its layout, an infotext, or (`bare_comments` not None) a comment.

    `bare_comments`: None for a text that is generation metadata by its place (`parameters`, a sidecar);
    True / False for a comment, read as a prompt only when True.
    """
    if layouts.looks_like_json(text):
        found = layouts.read_json_text(text, origin)
        if found is not None:
            return relabel(found, origin)
    info = parse_infotext(text)
    if info is None:
        return None
    if bare_comments is not None and not has_settings(info):
        if bare_comments:
            return PromptInfo(info.prompt, origin=origin, reader="comment")
        return NoPrompt("no_prompt", f"{origin}: a comment without generation settings ({info.prompt[:60]!r}); "
                        "set bare_comments to read comments as prompts", origin, "comment")
    if _placeholder(info):
        return NoPrompt("prompt_not_stored", f"{origin}: a ComfyUI save node wrote the placeholder "
                        f"{_PLACEHOLDER!r} for the prompt (its prompt input was not connected)", origin, "a1111")
    if not info.prompt:
        return NoPrompt("no_prompt", f"{origin}: generation settings without a prompt", origin, info.reader,
                        info.gen_meta)
    if not has_settings(info):
        return PromptInfo(info.prompt, None, {}, origin, "text")
    return relabel(info, origin)


def _json_chunk(text: str, origin: str) -> Reading:
    try:
        doc = load_json(text, origin)
    except NotJson:
        return NoPrompt("unknown_metadata_format", f"{origin}: not JSON", origin)
    return relabel(layouts.read_document(doc, origin), origin)


# ---- containers -------------------------------------------------------------------------------------------------


def _png(found: containers.Carriers, data: bytes, bare_comments: bool) -> list[Reading]:
    texts = found.texts
    out: list[Reading | None] = []
    if texts.get("parameters", "").strip():
        out.append(_text(texts["parameters"], "png:parameters", bare_comments=None))
    elif texts.get("parameters-json", "").strip():
        out.append(_json_chunk(texts["parameters-json"], "png:parameters-json"))
    graph = _json_chunk(texts["prompt"], "comfyui:prompt") if "prompt" in texts else None
    tensorart = _json_chunk(texts["generation_data"].strip("\0"), "png:generation_data") \
        if "generation_data" in texts else None
    if isinstance(graph, PromptInfo) and tensorart is not None:
        graph = _tensorart(graph, tensorart)
    elif tensorart is not None:
        graph = tensorart  # TensorArt's own record, when its graph gives no prompt
    out.append(graph)
    unusable = graph is None or (isinstance(graph, NoPrompt) and graph.reason == "unknown_metadata_format")
    if "workflow" in texts and unusable:
        out.append(_json_chunk(texts["workflow"], "comfyui:workflow"))  # the UI graph only without the API one
    if "invokeai_metadata" in texts:
        out.append(relabel(_json_chunk(texts["invokeai_metadata"], "png:invokeai_metadata"),
                           "png:invokeai_metadata", "invokeai"))
    if "sd-metadata" in texts:
        out.append(_json_chunk(texts["sd-metadata"], "png:sd-metadata"))
    if "Dream" in texts:
        dream = layouts.read_dream(texts["Dream"])
        out.append(relabel(dream, "png:Dream") if dream is not None else None)
    out += _png_comment(texts, bare_comments)
    if found.exif:
        out += _exif(found.exif, bare_comments)
    readings = [r for r in out if r is not None]
    if not any(isinstance(r, PromptInfo) for r in readings):
        stealth = stealth_text(data)
        hidden = _text(stealth, "png:stealth", bare_comments=None) if stealth else None
        if hidden is not None:
            readings.insert(0, hidden)
    return readings


def _tensorart(graph: PromptInfo, record: Reading) -> PromptInfo:
    """TensorArt: the prompt and settings that ran are the graph's; the model's name and the record are its own."""
    meta = {**graph.gen_meta, "tool": "tensorart"}
    if record.gen_meta.get("model"):
        meta["model"] = record.gen_meta["model"]
    if "source_meta" in record.gen_meta:
        meta["source_meta"] = record.gen_meta["source_meta"]
    return PromptInfo(graph.prompt, graph.negative_prompt, meta, graph.origin, "tensorart")


def _png_comment(texts: dict[str, str], bare_comments: bool) -> list[Reading | None]:
    comment = texts.get("Comment")
    if comment is not None and layouts.looks_like_json(comment):
        try:
            doc = load_json(comment, "png:Comment")
        except NotJson:
            doc = None  # braces around plain words (`{masterpiece}, a fox, {blue sky}`): read below as text
        if isinstance(doc, dict) and (str(texts.get("Software", "")).startswith("NovelAI") or "uc" in doc):
            found = layouts._novelai(doc, texts.get("Description"), texts.get("Source"))
            return [relabel(found, "png:Comment")]
        if doc is not None:
            return [relabel(layouts.read_document(doc, "png:Comment"), "png:Comment")]
    return [_text(texts[key], f"png:{key}", bare_comments=bare_comments)
            for key in ("Comment", "Description") if texts.get(key, "").strip()]


def _exif(exif: bytes, bare_comments: bool) -> list[Reading | None]:
    tags = exif_texts(exif)
    out: list[Reading | None] = []
    if "UserComment" in tags:
        out.append(_text(tags["UserComment"], "exif:UserComment", bare_comments=bare_comments))
    graphs = {}
    for name in ("Model", "Make", "ImageDescription"):  # ComfyUI writes `prompt:` / `workflow:` here
        match = _COMFY_TAG.match(tags.get(name, "")[:32])
        if match:
            graphs.setdefault(match.group(1).lower(), (name, tags[name][match.end():]))
    for kind in ("prompt", "workflow"):
        if kind in graphs:
            name, text = graphs[kind]
            out.append(_json_chunk(text, f"exif:{name}"))
            break
    if "ImageDescription" in tags and not graphs:
        out.append(_text(tags["ImageDescription"], "exif:ImageDescription", bare_comments=bare_comments))
    return out


def _jpeg(found: containers.Carriers, bare_comments: bool) -> list[Reading | None]:
    out = _exif(found.exif, bare_comments) if found.exif else []
    return out + [_text(c, "jpeg:comment", bare_comments=bare_comments) for c in found.comments if c.strip()]


def examine(data: bytes, *, bare_comments: bool = False) -> list[Reading]:
    """Every reading of the metadata in image bytes (PNG, JPEG, WebP), in the order readers are tried."""
    kind = containers.image_kind(data)
    try:
        found = containers.carriers(data)
        large = [name for name in found.too_large if name in _KNOWN_KEYWORDS or name in ("eXIf", "EXIF")]
        if large:
            return [NoPrompt("metadata_too_large", f"{kind} metadata {large[0]!r} is over {MAX_TEXT_BYTES} bytes",
                             f"{kind}:{large[0]}")]
        if kind == "png":
            readings: list[Reading | None] = list(_png(found, data, bare_comments))
        elif kind == "jpeg":
            readings = _jpeg(found, bare_comments)
        elif kind == "webp":
            readings = _exif(found.exif, bare_comments) if found.exif else []
        else:
            return []
    except OverBound as e:
        return [NoPrompt(e.reason, e.detail, kind or "")]
    except (ValueError, struct.error, IndexError):  # garbage in a container: nothing readable there
        return []
    return [r for r in readings if r is not None]


def decide(readings: list[Reading]) -> Reading | None:
    """The first prompt found; else the first reason there is none; None when there was no metadata at all."""
    return next((r for r in readings if isinstance(r, PromptInfo)), readings[0] if readings else None)


def read_image(data: bytes, *, bare_comments: bool = False) -> Reading | None:
    """The prompt in image bytes, why there is none (`NoPrompt`), or None when they hold no metadata."""
    return decide(examine(data, bare_comments=bare_comments))


def read_embedded(data: bytes, *, bare_comments: bool = True) -> PromptInfo | None:
    """The prompt embedded in image file bytes (PNG, JPEG, WebP; detected by signature), or None.

    A comment without settings counts here unless `bare_comments=False`; the folder source asks for that.
    """
    found = read_image(data, bare_comments=bare_comments)
    return found if isinstance(found, PromptInfo) and found.prompt else None


# ---- sidecars ---------------------------------------------------------------------------------------------------


def read_sidecar(text: str, kind: str, name: str = "") -> Reading | None:
    """A `.json` or `.txt` sidecar's prompt, or why it has none; raises `OverBound` past a bound."""
    origin = f"sidecar:{kind}"
    where = f"{name or origin}"
    if len(text) > MAX_TEXT_BYTES:
        raise OverBound("metadata_too_large", f"{where}: {len(text)} bytes (limit {MAX_TEXT_BYTES})")
    if kind == "json":
        try:
            doc = load_json(text, where)
        except NotJson:
            return None
        return relabel(layouts.read_document(doc, where), origin)
    if layouts.looks_like_json(text):
        found = layouts.read_json_text(text, where)
        if found is not None:
            return relabel(found, origin)
    info = parse_prompt_text(text)
    return relabel(info, origin) if info is not None and info.prompt else None


def read_sidecar_json(text: str) -> PromptInfo | None:
    """The prompt of a `<stem>.json` sidecar, or None."""
    try:
        found = read_sidecar(text, "json")
    except OverBound:
        return None
    return found if isinstance(found, PromptInfo) else None


def read_sidecar_txt(text: str) -> PromptInfo | None:
    """The prompt of a `<stem>.txt` sidecar (an infotext or a plain prompt), or None."""
    try:
        found = read_sidecar(text, "txt")
    except OverBound:
        return None
    return found if isinstance(found, PromptInfo) else None


def parse_prompt_json(obj: object) -> PromptInfo | None:
    """A JSON object in any known layout (a flat `prompt` object, a ComfyUI graph, ...) as a prompt, or None."""
    found = layouts.read_document(obj, "json")
    return found if isinstance(found, PromptInfo) else None

