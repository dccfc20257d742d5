"""Generation metadata stored as a JSON document, read by its layout. JSON text is never itself a prompt.

Layouts, recognised by the document's own keys (never by where it was found) -> where the prompt is:

- ComfyUI API graph (node objects with `class_type`) and UI workflow (`nodes` + `links`): `surd.sources.comfyui`;
- ComfyUI save nodes such as SaveImagePlus (`prompt` holding a graph, `workflow`): the graph's;
- Civitai's generator (a graph + `extraMetadata`): the graph's, else `extraMetadata`'s `prompt` / `negativePrompt`;
- SwarmUI (`sui_image_params`): `prompt` / `negativeprompt`;
- Fooocus (`full_prompt`, `metadata_scheme: fooocus`): `full_prompt` / `full_negative_prompt`, the texts it
  encoded (its styles and prompt expansion applied), one line each;
- RuinedFooocus (`software: RuinedFooocus`, `Prompt` + `Negative`);
- NovelAI (`uc`, `v4_prompt`, `signed_hash`; PNG `Comment`, or wrapped with `Description` in WebP EXIF):
  `prompt` (or the `Description`), V4 character prompts one line each / `uc`;
- InvokeAI 3+ (`positive_prompt`) / `negative_prompt`; InvokeAI 2 `sd-metadata` (`app_id`, `image.prompt`):
  the prompt, its `[bracketed]` parts being the negative prompt;
- Stability Matrix `parameters-json` (`PositivePrompt` / `NegativePrompt`);
- TensorArt `generation_data` (`baseModel` + `ksamplerName`): `prompt` / `negativePrompt`;
- a flat object with a text under `prompt` in any case (HF Spaces, sidecars): `negative_prompt`,
  `negativePrompt` or `uc` beside it.

Anything else is `unknown_metadata_format`, naming the generator when the document says which.
"""

from __future__ import annotations

import re
from typing import Any

from surd.sources import comfyui
from surd.sources.bounds import NotJson, load_json
from surd.sources.genmeta import clean_text
from surd.sources.infotext import key_of, normalise_meta
from surd.sources.readings import NoPrompt, PromptInfo, Reading, joined

_PROMPT_KEYS = ("prompt", "positiveprompt", "positive")
_NEGATIVE_KEYS = ("negativeprompt", "negative", "uc")
_GENERATOR_KEYS = ("software", "generator", "app", "appid", "tool", "metadatascheme", "version", "swarmversion")
_BRACKETS = re.compile(r"[\[\]]")
_DREAM_FLAGS = {"-s": "steps", "-S": "seed", "-W": "width", "-H": "height", "-C": "cfg_scale", "-A": "sampler"}


def _by_key(doc: dict[str, Any]) -> dict[str, str]:
    """normalised key -> the document's own spelling of it (the first, when two spell the same key)."""
    out: dict[str, str] = {}
    for key in doc:
        out.setdefault(key_of(key), key)
    return out


def _pick(doc: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    spelled = _by_key(doc)
    for key in keys:
        if key in spelled:
            return spelled[key], doc[spelled[key]]
    return None, None


def _info(prompt: Any, negative: Any, meta: dict[str, Any], reader: str) -> Reading:
    text = clean_text(prompt) if isinstance(prompt, str) else None
    if text is None:
        return NoPrompt("no_prompt", f"{reader} metadata without a prompt", reader=reader, gen_meta=meta)
    negative = clean_text(negative) if isinstance(negative, str) else None
    return PromptInfo(text.strip(), negative.strip() if negative else None, meta, reader=reader)


def generator_of(doc: dict[str, Any]) -> str | None:
    """The generator a document names (`software`, `app_id`, `version`, ...), if any."""
    name, value = _pick(doc, _GENERATOR_KEYS)
    return f"{name}: {value}" if isinstance(value, str | int | float) and name else None


def unknown(doc: Any, where: str) -> NoPrompt:
    """The answer for a JSON document in no known layout."""
    named = generator_of(doc) if isinstance(doc, dict) else None
    keys = ", ".join(list(map(str, doc))[:6]) if isinstance(doc, dict) else type(doc).__name__
    detail = f"{where}: JSON in no known layout ({named or 'generator unknown'}; keys: {keys})"
    return NoPrompt("unknown_metadata_format", detail, reader="json")


# ---- the layouts ------------------------------------------------------------------------------------------------


def _comfy(doc: dict[str, Any]) -> Reading | None:
    graph = {k: v for k, v in doc.items() if isinstance(v, dict) and "class_type" in v}
    found = comfyui.read_api_graph(graph) if graph else None
    if "extraMetadata" not in doc:
        return found
    if isinstance(found, PromptInfo):
        return _with(found, tool="civitai")  # Civitai's generator runs ComfyUI graphs
    # Civitai's generator: an upscale-only graph keeps the prompt of the original generation aside
    try:
        extra = load_json(doc["extraMetadata"], "extraMetadata") if isinstance(doc["extraMetadata"], str) else None
    except NotJson:
        extra = None
    if isinstance(extra, dict) and isinstance(extra.get("prompt"), str):
        return _flat(extra, "civitai", "civitai")
    return found


def _swarmui(doc: dict[str, Any]) -> Reading:
    params = doc["sui_image_params"]
    raw = {k: v for k, v in params.items() if k not in ("prompt", "negativeprompt")}
    return _info(params.get("prompt"), params.get("negativeprompt"), {**normalise_meta(raw, "swarmui"),
                                                                          "source_meta": doc}, "swarmui")


def _fooocus(doc: dict[str, Any]) -> Reading:
    meta = {**normalise_meta(doc, "fooocus"), "source_meta": doc}
    meta.update({k: v for k, v in (("model", clean_text(doc.get("base_model"))),
                                   ("model_hash", clean_text(doc.get("base_model_hash")))) if v})
    full = doc.get("full_prompt")
    prompt = joined(full) if isinstance(full, list) else doc.get("prompt")
    negatives = doc.get("full_negative_prompt")
    negative = joined(negatives) if isinstance(negatives, list) else doc.get("negative_prompt")
    return _info(prompt, negative, meta, "fooocus")


def _novelai(doc: dict[str, Any], description: str | None = None, source: str | None = None) -> Reading:
    """NovelAI's `Comment` settings; the prompt is in them (V3+) or in the `Description` beside them."""
    raw = {k: v for k, v in doc.items() if k not in ("prompt", "uc")}
    meta = normalise_meta(raw, "novelai")
    meta["source_meta"] = doc
    if source:
        meta["model"] = source
    prompt = doc.get("prompt") if isinstance(doc.get("prompt"), str) else (description or "").strip("\0")
    negative = doc.get("uc")
    captions = doc.get("v4_prompt", {}).get("caption", {}) if isinstance(doc.get("v4_prompt"), dict) else {}
    uncaptions = (doc.get("v4_negative_prompt", {}).get("caption", {})
                  if isinstance(doc.get("v4_negative_prompt"), dict) else {})
    # V4 character prompts are encoded beside the base prompt: one line each
    chars = [c.get("char_caption") for c in captions.get("char_captions") or [] if isinstance(c, dict)]
    unchars = [c.get("char_caption") for c in uncaptions.get("char_captions") or [] if isinstance(c, dict)]
    if isinstance(prompt, str) and chars:
        prompt = joined([prompt, *chars])
    if isinstance(negative, str) and unchars:
        negative = joined([negative, *unchars])
    return _info(prompt, negative, meta, "novelai")


def _novelai_wrapped(doc: dict[str, Any]) -> Reading:
    """NovelAI WebP: the PNG text chunks as one JSON object in EXIF UserComment, `Comment` a JSON string."""
    try:
        comment = load_json(doc["Comment"], "NovelAI Comment") if isinstance(doc["Comment"], str) else doc["Comment"]
    except NotJson:
        comment = None
    if not isinstance(comment, dict):
        return unknown(doc, "NovelAI")
    description = doc.get("Description") if isinstance(doc.get("Description"), str) else None
    return _novelai(comment, description, doc.get("Source") if isinstance(doc.get("Source"), str) else None)


def split_brackets(prompt: str) -> tuple[str, str | None]:
    """InvokeAI 2 prompt syntax: `[bracketed]` parts are the negative prompt. (positive, negative)."""
    keep, drop = [], []
    depth, start = 0, 0
    for match in _BRACKETS.finditer(prompt):
        at = match.start()
        if match.group() == "[":
            if depth == 0:
                keep.append(prompt[start:at])
                start = at + 1
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                drop.append(prompt[start:at])
                start = at + 1
    (keep if depth == 0 else drop).append(prompt[start:])
    positive = re.sub(r"[ \t]{2,}", " ", "".join(keep)).strip()
    return positive, joined(drop, ", ") or None


def _invokeai2(doc: dict[str, Any]) -> Reading:
    image = doc.get("image") if isinstance(doc.get("image"), dict) else {}
    prompt = image.get("prompt")
    if isinstance(prompt, list):  # [{"prompt": ..., "weight": ...}, ...]
        prompt = joined([p.get("prompt") for p in prompt if isinstance(p, dict)], ", ")
    meta = normalise_meta({k: v for k, v in image.items() if k != "prompt"}, "invokeai")
    meta.update({k: v for k, v in (("model", clean_text(doc.get("model_weights"))),
                                   ("model_hash", clean_text(doc.get("model_hash")))) if v})
    meta["source_meta"] = doc
    if not isinstance(prompt, str):
        return _info(None, None, meta, "invokeai")
    positive, negative = split_brackets(prompt)
    return _info(positive, negative, meta, "invokeai")


def read_dream(text: str) -> Reading | None:
    """InvokeAI 2's `Dream` chunk: `"prompt [negative]" -s 50 -S 42 -W 512 -H 768 -C 7.5 -A k_lms ...`."""
    text = text.strip()
    end = text.rfind('"')
    if not text.startswith('"') or end <= 0:
        return None
    tail = text[end + 1:].strip()
    if tail and not tail.startswith("-"):
        return None
    words = tail.split()
    flags = {_DREAM_FLAGS.get(words[i], words[i]): words[i + 1] for i in range(len(words) - 1)
             if words[i].startswith("-") and not words[i + 1].startswith("-")}
    positive, negative = split_brackets(text[1:end])
    return _info(positive, negative, {**normalise_meta(flags, "invokeai"), "source_meta": text}, "invokeai-dream")


def _flat(doc: dict[str, Any], reader: str = "json", tool: str | None = None) -> Reading:
    key, prompt = _pick(doc, _PROMPT_KEYS)
    neg_key, negative = _pick(doc, _NEGATIVE_KEYS)
    rest = {k: v for k, v in doc.items() if k not in (key, neg_key)}
    return _info(prompt, negative, normalise_meta(rest, tool), reader)


def read_document(doc: Any, where: str) -> Reading:
    """The prompt in a JSON document of any known layout, or why there is none."""
    if not isinstance(doc, dict):
        return unknown(doc, where)
    keys = _by_key(doc)
    if any(isinstance(v, dict) and "class_type" in v for v in doc.values()):
        return _comfy(doc) or unknown(doc, where)
    if isinstance(doc.get("nodes"), list) and "links" in doc:
        return comfyui.read_workflow(doc) or unknown(doc, where)
    if isinstance(doc.get("prompt"), dict):  # a ComfyUI save node's {"prompt": graph, "workflow": ...}
        found = comfyui.read_api_graph(doc["prompt"])
        if not isinstance(found, PromptInfo) and isinstance(doc.get("workflow"), dict):
            found = comfyui.read_workflow(doc["workflow"]) or found
        return found or unknown(doc, where)
    if isinstance(doc.get("sui_image_params"), dict):
        return _swarmui(doc)
    if "fullprompt" in keys or doc.get("metadata_scheme") == "fooocus":
        return _fooocus(doc)
    if str(doc.get("software", "")).lower() == "ruinedfooocus" or {"Prompt", "Negative"} <= set(doc):
        return _flat(doc, "ruinedfooocus", "ruinedfooocus")
    if isinstance(doc.get("Comment"), str | dict) and str(doc.get("Software", "")).startswith("NovelAI"):
        return _novelai_wrapped(doc)
    if {"uc", "signedhash", "v4prompt", "requesttype"} & set(keys) and "negativeprompt" not in keys:
        return _novelai(doc)
    if "positive_prompt" in doc:
        return _flat(doc, "invokeai", "invokeai")
    image = doc.get("image")
    if "invoke-ai" in str(doc.get("app_id", "")).lower() or (isinstance(image, dict) and "prompt" in image):
        return _invokeai2(doc)
    if "PositivePrompt" in doc:
        return _flat(doc, "stability-matrix", "stability-matrix")
    if isinstance(doc.get("baseModel"), dict) and "ksamplerName" in doc:
        found = _flat(doc, "tensorart", "tensorart")
        model = doc["baseModel"].get("modelFileName")
        return _with(found, model=model) if isinstance(model, str) else found
    if isinstance(_pick(doc, _PROMPT_KEYS)[1], str):
        return _flat(doc)
    return unknown(doc, where)


def _with(found: Reading, **meta: Any) -> Reading:
    merged = {**found.gen_meta, **meta}
    if isinstance(found, PromptInfo):
        return PromptInfo(found.prompt, found.negative_prompt, merged, found.origin, found.reader)
    return NoPrompt(found.reason, found.detail, found.origin, found.reader, merged)


def looks_like_json(text: str) -> bool:
    """Whether a text is shaped like a JSON object or array (and so must be read as a document)."""
    stripped = text.lstrip()
    return stripped[:1] in ("{", "[") and text.rstrip()[-1:] in ("}", "]")


def read_json_text(text: str, where: str) -> Reading | None:
    """A text that is a JSON document, read by its layout; None when the text is not JSON at all."""
    try:
        doc = load_json(text, where)
    except NotJson:
        return None
    return read_document(doc, where)
