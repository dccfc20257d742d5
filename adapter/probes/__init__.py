"""Shipped probe sets: templated prompts whose count, colour or relation is known.

Each `<category>.yaml` holds probes: a narrative `prompt` to generate from, the `alternatives` CLIP
chooses between zero-shot (scored as "a photo of <alternative>"), and `answer`, the index of the
alternative that describes the prompt. A user's own YAML file of the same layout works too, and may give
each probe a `keyword_prompt` (what the `keyword` arm generates from) and `attributes` (the prompt's true
attributes, a mapping, for an attribute-reading scorer such as `surd experiment`'s judge); `alternatives`
are then optional.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from surd.errors import SurdError

PROBE_SETS = ("counting", "colour", "action")


@dataclass(frozen=True)
class Probe:
    id: str
    category: str
    prompt: str
    alternatives: tuple[str, ...] = ()
    answer: int | None = None
    keyword_prompt: str | None = None
    attributes: tuple[tuple[str, str], ...] = ()  # sorted (name, value) pairs: hashable, one order


def _probe(raw: dict, category: str) -> Probe:
    attributes = raw.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise TypeError("attributes must be a mapping of attribute to value")
    keyword = raw.get("keyword_prompt")
    return Probe(str(raw["id"]), category, str(raw["prompt"]), tuple(str(a) for a in raw.get("alternatives") or ()),
                 None if raw.get("answer") is None else int(raw["answer"]), None if keyword is None else str(keyword),
                 tuple(sorted((str(k), str(v)) for k, v in attributes.items())))


def _read(name: str) -> tuple[str, str]:
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SurdError(f"--probes {name}: file not found")
        return path.read_text(), str(path)
    bundled = resources.files("adapter.probes") / f"{name}.yaml"
    if not bundled.is_file():
        raise SurdError(f"--probes {name!r}: not a YAML file and not a shipped set ({', '.join(PROBE_SETS)})")
    return bundled.read_text(), f"probe set {name}"


def load_probe_set(name: str) -> list[Probe]:
    """A shipped set by name (`counting`) or a YAML file of the same layout, validated."""
    text, where = _read(name)
    try:
        raw = yaml.safe_load(text)
        category = str(raw["category"])
        probes = [_probe(p, category) for p in raw["probes"]]
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise SurdError(f"{where}: not a valid probe set ({type(e).__name__}: {e})") from None
    seen: set[str] = set()
    for probe in probes:
        if probe.id in seen:
            raise SurdError(f"{where}: probe id {probe.id!r} appears twice")
        seen.add(probe.id)
        if not probe.alternatives and probe.answer is None:
            continue  # no zero-shot question: scored against its prompt (and its attributes, if any)
        if len(probe.alternatives) < 2 or len(set(probe.alternatives)) != len(probe.alternatives):
            raise SurdError(f"{where}: probe {probe.id}: needs at least two distinct alternatives")
        if probe.answer is None or not 0 <= probe.answer < len(probe.alternatives):
            raise SurdError(f"{where}: probe {probe.id}: answer {probe.answer} is not an index of its alternatives")
    return probes


def load_probes(names: list[str]) -> list[Probe]:
    """Several probe sets, in the order given."""
    return [probe for name in names for probe in load_probe_set(name)]
