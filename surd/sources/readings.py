"""What a metadata reader returns: a prompt it found (`PromptInfo`) or why there is none (`NoPrompt`).

Reasons a `NoPrompt` gives (each becomes the `drop_reason` of the row):

- `no_prompt`: the metadata holds no prompt (settings only, an empty graph, a comment without settings);
- `prompt_not_stored`: the text that was encoded is not in the file (made at run time by a graph node, or a
  save node wrote a placeholder);
- `unknown_metadata_format`: generation metadata in a layout no reader knows (the generator named when it can
  be told);
- the bound reasons of `surd.sources.bounds` (`metadata_too_large`, `json_too_deep`, `graph_too_large`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromptInfo:
    prompt: str
    negative_prompt: str | None = None
    gen_meta: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # where it was found, e.g. "png:parameters", "exif:UserComment", "sidecar:json"
    reader: str = ""  # which layout was read there, e.g. "a1111", "comfyui", "swarmui", "json"


@dataclass(frozen=True)
class NoPrompt:
    reason: str
    detail: str
    origin: str = ""
    reader: str = ""
    gen_meta: dict[str, Any] = field(default_factory=dict)


Reading = PromptInfo | NoPrompt


def relabel(found: Reading, origin: str, tool: str | None = None) -> Reading:
    """`found` with its origin set, and `tool` put first in its gen_meta when given."""
    meta = {"tool": tool, **{k: v for k, v in found.gen_meta.items() if k != "tool"}} if tool else found.gen_meta
    if isinstance(found, PromptInfo):
        return PromptInfo(found.prompt, found.negative_prompt, meta, origin, found.reader)
    return NoPrompt(found.reason, found.detail, origin, found.reader, meta)


def joined(parts: list[str], separator: str = "\n") -> str:
    """Non-blank parts, stripped, joined: several texts encoded for one image become one prompt."""
    return separator.join(p.strip() for p in parts if isinstance(p, str) and p.strip())
