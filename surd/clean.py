"""The clean stage: prompt normalisation and prompt/image filters; it measures images for dedup (sha256, phash).

Prompt cleaning turns AUTOMATIC1111 / ComfyUI prompt syntax into plain keyword text:

- attention: `(word:1.2)`, `((word))`, `[word]` -> `word`; escaped `\\(` `\\)` `\\[` `\\]` stay literal brackets;
- prompt editing `[from:to:when]` / `[to:when]` / `[from::when]` keeps the text active at the *last* sampling
  step (`to`, `to`, nothing): that is what the finished image shows the most of;
- alternation `[a|b]` keeps the first alternative;
- extra networks `<lora:name:0.7>`, `<hypernet:...>`, `<lyco:...>` (any `<word:...>`) and ComfyUI
  `embedding:name` are removed, `BREAK` becomes a comma, configured embedding names are removed;
- newlines become commas, duplicate commas and whitespace collapse, leading/trailing separators go.

A raw prompt over `max_raw_chars` (default `MAX_RAW_CHARS`) is dropped as `prompt_too_long` before parsing.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from typing import Any

from PIL import Image
from pydantic import Field, model_validator

from surd.phash import phash
from surd.rows import Drop, RowProcessor, StageConfig

DEFAULT_EMBEDDINGS = [
    "easynegative",
    "badhandv4",
    "bad-hands-5",
    "bad_prompt",
    "bad_prompt_version2",
    "bad-artist",
    "bad-artist-anime",
    "ng_deepnegative_v1_75t",
    "negative_hand-neg",
    "verybadimagenegative_v1.3",
    "fastnegativev2",
    "unaestheticxl",
]

_EXTRA_NETWORK = re.compile(r"<\s*\w+\s*:[^<>]*>")
_COMFY_EMBEDDING = re.compile(r"\bembedding:[\w.\-]+", re.IGNORECASE)
_BREAK = re.compile(r"\bBREAK\b")
_SPECIAL = re.compile(r"[\\()\[\]:|]")  # the characters the attention parser acts on; text between them is copied
_SEPARATOR_RUN = re.compile(r"[\s,]+")
_ESCAPABLE = "()[]\\"
_CLOSER = {"(": ")", "[": "]"}

# Raw prompts longer than this are dropped (prompt_too_long) before parsing. Parsing is linear in the text times
# its bracket depth (each group's text is copied once per enclosing group), so the bound keeps a crafted prompt
# under a fifth of a second; real prompts, extra networks and weights included, stay far below it.
MAX_RAW_CHARS = 20_000


def _is_weight(text: str) -> bool:
    """An attention weight (`1.2`, ` -.5 `): what the regex `\\s*[+-]?(\\d+\\.?\\d*|\\.\\d+)\\s*` matches, without its
    quadratic backtracking on a long run of digits."""
    s = text.strip()
    s = s[1:] if s[:1] in ("+", "-") else s
    head, dot, tail = s.partition(".")
    if not dot:
        return head.isdecimal()
    return bool(head or tail) and (not head or head.isdecimal()) and (not tail or tail.isdecimal())


def _interleave(chunks: list[str], seps: list[str]) -> str:
    parts = [chunks[0]]
    for sep, chunk in zip(seps, chunks[1:], strict=True):
        parts += (sep, chunk)
    return "".join(parts)


def _resolve(opener: str | None, chunks: list[str], seps: list[str]) -> str:
    """The plain text of one bracket group, given its parts split at top-level ':' and '|'."""
    numeric_tail = len(chunks) >= 2 and seps[-1] == ":" and _is_weight(chunks[-1])
    if opener == "(":
        return _interleave(chunks[:-1], seps[:-1]) if numeric_tail else _interleave(chunks, seps)
    if opener == "[":
        if "|" in seps:
            return chunks[0]  # alternation: keep the first alternative
        if numeric_tail and len(chunks) == 3:
            return chunks[1]  # [from:to:when] -> to
        if numeric_tail and len(chunks) == 2:
            return chunks[0]  # [to:when] -> to
    return _interleave(chunks, seps)


class _Group:
    """One open bracket group while parsing: its opener and its parts so far (lists of pieces, joined once)."""

    __slots__ = ("opener", "chunks", "seps")

    def __init__(self, opener: str | None) -> None:
        self.opener = opener
        self.chunks: list[list[str]] = [[]]
        self.seps: list[str] = []

    def text(self) -> str:
        return _resolve(self.opener, ["".join(chunk) for chunk in self.chunks], self.seps)


def strip_attention(text: str) -> str:
    """Remove A1111 attention / prompt-editing / alternation syntax (see module doc).

    Iterative (an explicit stack of open groups, so any depth parses) and linear in the text times its depth."""
    stack = [_Group(None)]
    i, n = 0, len(text)
    while i < n:
        found = _SPECIAL.search(text, i)
        j = found.start() if found else n
        top = stack[-1]
        if j > i:
            top.chunks[-1].append(text[i:j])
        if found is None:
            break
        c, i = text[j], j + 1
        if c == "\\":
            if i < n and text[i] in _ESCAPABLE:
                top.chunks[-1].append(text[i])
                i += 1
            else:
                top.chunks[-1].append(c)
        elif c in _CLOSER:
            stack.append(_Group(c))
        elif top.opener is not None and c == _CLOSER[top.opener]:
            stack.pop()
            stack[-1].chunks[-1].append(top.text())
        elif c in ")]":
            pass  # a stray closer: A1111 ignores it, so do we
        elif top.opener is not None:  # ':' or '|' inside a group separates its parts
            top.seps.append(c)
            top.chunks.append([])
        else:
            top.chunks[-1].append(c)
    while len(stack) > 1:  # an unclosed group ends with the text
        group = stack.pop()
        stack[-1].chunks[-1].append(group.text())
    return stack[0].text()


def tidy_separators(text: str) -> str:
    """Newlines become commas, runs of whitespace and commas collapse to `, ` or ` `; separators at the ends go."""

    def collapse(run: re.Match[str]) -> str:
        s = run.group()
        return ", " if ("," in s or "\n" in s or "\r" in s) else " "

    return _SEPARATOR_RUN.sub(collapse, text).strip(" ,;|")


def embeddings_pattern(names: list[str]) -> re.Pattern[str] | None:
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w\-.])(?:{alternatives})(?![\w\-])", re.IGNORECASE)


def clean_prompt(text: str | None, embeddings: re.Pattern[str] | None = None) -> str:
    """Plain keyword text from an A1111/ComfyUI prompt (see module doc)."""
    if not text:
        return ""
    text = _EXTRA_NETWORK.sub(",", text)
    text = _COMFY_EMBEDDING.sub(",", text)
    text = strip_attention(text)
    text = _BREAK.sub(",", text)
    if embeddings is not None:
        text = embeddings.sub(",", text)
    return tidy_separators(text)


class CleanConfig(StageConfig):
    """Recipe section `clean:`."""

    min_chars: int = Field(10, ge=0, description="drop cleaned prompts shorter than this (prompt_too_short)")
    max_chars: int = Field(1000, ge=1, description="drop cleaned prompts longer than this (prompt_too_long)")
    max_raw_chars: int = Field(MAX_RAW_CHARS, ge=1, description="drop raw (or negative) prompts longer than this "
                               "before parsing them (prompt_too_long)")
    min_words: int | None = Field(None, ge=0, description="optional word minimum (prompt_too_short)")
    max_words: int | None = Field(None, ge=1, description="optional word maximum (prompt_too_long)")
    min_side: int = Field(64, ge=1, description="drop images whose shorter side is below this (image_too_small)")
    max_pixels: int = Field(89_478_485, ge=1, description="drop images with more pixels than this (decompression_bomb)")
    embeddings: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EMBEDDINGS), description="textual-inversion names removed from prompts"
    )

    @model_validator(mode="after")
    def _ranges(self) -> CleanConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars})")
        if self.min_words is not None and self.max_words is not None and self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) is above max_words ({self.max_words})")
        return self

    def build(self) -> Cleaner:
        return Cleaner(self)


class Cleaner(RowProcessor):
    """Cleans prompts, checks and measures the image, fills width/height/format/sha256/phash."""

    def __init__(self, config: CleanConfig) -> None:
        self.config = config
        self.embeddings = embeddings_pattern(config.embeddings)

    def process_row(self, row: dict[str, Any]) -> dict[str, Any] | Drop:
        out = dict(row)
        raw = row.get("keyword_prompt_raw")
        if raw is None:
            raw = row.get("keyword_prompt")
            out["keyword_prompt_raw"] = raw
        for label, text in (("raw prompt", raw), ("negative prompt", row.get("negative_prompt"))):
            if text and len(text) > self.config.max_raw_chars:
                return Drop("prompt_too_long", f"{label} {len(text)} chars > max_raw_chars {self.config.max_raw_chars}",
                            row=out)
        prompt = clean_prompt(raw, self.embeddings)
        out["keyword_prompt"] = prompt
        out["negative_prompt"] = clean_prompt(row.get("negative_prompt"), self.embeddings) or None
        problem = self._check_prompt(prompt)
        if problem is not None:
            return Drop(*problem, row=out)
        image = row.get("image") or {}
        data = image.get("bytes")
        if not data:
            return Drop("no_image", f"no image bytes (path={image.get('path')!r})", row=out)
        problem = self._measure(data, out)
        if problem is not None:
            return Drop(*problem, row=out)
        return out

    def _check_prompt(self, prompt: str) -> tuple[str, str] | None:
        c = self.config
        if not prompt:
            return "empty_prompt", ""
        words = len(prompt.split())
        if len(prompt) < c.min_chars:
            return "prompt_too_short", f"{len(prompt)} chars < min_chars {c.min_chars}"
        if c.min_words is not None and words < c.min_words:
            return "prompt_too_short", f"{words} words < min_words {c.min_words}"
        if len(prompt) > c.max_chars:
            return "prompt_too_long", f"{len(prompt)} chars > max_chars {c.max_chars}"
        if c.max_words is not None and words > c.max_words:
            return "prompt_too_long", f"{words} words > max_words {c.max_words}"
        return None

    def _measure(self, data: bytes, out: dict[str, Any]) -> tuple[str, str] | None:
        """Decode fully and fill the image columns of `out`; returns a drop (reason, detail) or None."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
                with Image.open(io.BytesIO(data)) as img:
                    width, height = img.size
                    if width * height > self.config.max_pixels:
                        return "decompression_bomb", f"{width}x{height} > max_pixels {self.config.max_pixels}"
                    img.load()
                    fmt = img.format
                    hash_value = phash(img)
        except Image.DecompressionBombError as e:
            return "decompression_bomb", str(e)
        except Exception as e:  # Pillow raises many types for corrupt data; all mean "cannot decode"
            return "undecodable_image", f"{type(e).__name__}: {e}"
        out.update(
            width=width,
            height=height,
            image_format=fmt,
            sha256=hashlib.sha256(data).hexdigest(),
            phash=hash_value,
        )
        if min(width, height) < self.config.min_side:
            return "image_too_small", f"{width}x{height} < min_side {self.config.min_side}"
        return None
