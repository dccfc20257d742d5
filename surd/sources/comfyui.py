"""Prompts from ComfyUI graphs: the API `prompt` graph and the UI `workflow` graph that ComfyUI embeds.

The API graph maps node id -> {"class_type", "inputs"}; an input is a literal or a link `[node_id, output_index]`.

Which sampler: the image a file holds came out of a save (or preview) node. From it the walk goes back along
the image/latent line (decode, upscale, encode, composite canvas) through every sampling pass. With several
save nodes, the one whose line has the most passes is the final image (a save node beats a preview node).
- The prompt is what reached the *last* pass's `positive` input (and `negative`): the text that last guided
  the pixels. In a hires-fix graph it is the same text as the first pass's.
- The settings (`gen_meta`) are the *first* pass's, the one that started from noise: seed, steps, cfg,
  sampler, scheduler, denoise, model (+ LoRAs), and the size of its empty latent. A1111 records a hires-fix
  image the same way.
A graph without a save node falls back to its samplers, first passes (fed by an empty latent) first.

Text is followed through conditioning nodes (combine, area, ControlNet, guiders), reroutes, primitives, text
boxes, switches (resolved by their switch value) and string concatenations, in subgraphs too; input names
match case-insensitively (`Text`, `prompt`). Where the text reaching the sampler is made by another node at run
time (an LLM, a captioner, a tagger), it is not in the file: that is a `prompt_not_stored` answer, never a
guess. Every walk keeps a visited set and a step budget (`surd.sources.bounds`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from surd.sources.bounds import MAX_GRAPH_NODES, MAX_WALK_STEPS, OverBound
from surd.sources.comfyui_workflow import WIDGETS, Graph, widget_inputs, workflow_to_graph
from surd.sources.infotext import normalise_meta, parse_size
from surd.sources.readings import NoPrompt, PromptInfo, Reading

__all__ = ["WIDGETS", "is_link", "parse_api_graph", "parse_workflow", "read_api_graph", "read_workflow",
           "widget_inputs", "workflow_to_graph"]

TEXT_KEYS = ("text", "text_g", "text_l", "clip_l", "t5xxl", "prompt")
_STRING_KEYS = ("text", "string", "value", "prompt", "positive", "wildcard_text")
_SCALAR_KEYS = ("value", "seed", "noise_seed", "int", "float", "number", "boolean")
_ZEROING = {"conditioningzeroout"}  # outputs empty conditioning: its input is not the negative prompt
_META_KEYS = {"seed": "seed", "noise_seed": "seed", "steps": "steps", "cfg": "cfg", "sampler_name": "sampler",
              "scheduler": "scheduler", "denoise": "denoise"}
_MODEL_KEYS = ("ckpt_name", "unet_name")
_LINE_INPUTS = ("images", "image", "samples", "samples_to", "latent_image", "latent", "latents", "pixels",
                "destination")
_SAMPLER_LATENT = ("latent_image", "latent", "samples")
_SWITCH_KEYS = ("switch", "boolean", "condition", "cond", "select", "input", "index", "value")
_CONCAT = re.compile(r"(?:string|text)_?(\d+|[a-f])")
_GENERATORS = re.compile(r"generat|llm|ollama|gpt|gemini|claude|caption|tagger|florence|interrogat|vlm|chat",
                         re.IGNORECASE)
_MAX_DEPTH = 200  # links followed in a row before the graph is judged too deep to trust


def is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def _id_key(node_id: str) -> list[tuple[int, int, str]]:
    """Natural order of node ids such as "3", "10", "12:5"."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in node_id.split(":")]


def _dedupe(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


@dataclass(frozen=True)
class Missing:
    """A text that cannot be known from the graph: made at run time (`runtime`), or the links are broken."""

    detail: str
    runtime: bool


class _Walker:
    def __init__(self, graph: Graph) -> None:
        if len(graph) > MAX_GRAPH_NODES:
            raise OverBound("graph_too_large", f"ComfyUI graph with {len(graph)} nodes (limit {MAX_GRAPH_NODES})")
        self.graph = {str(k): v for k, v in graph.items() if isinstance(v, dict)}
        self.steps = 0
        self._lower: dict[str, dict[str, Any]] = {}
        self._strings: dict[tuple[str, int], str | Missing] = {}
        self._texts: dict[tuple[str, int, str], list[str] | Missing] = {}
        self._active: set[Any] = set()
        named = [n for n in self.graph if self._feeds_sampler(n) and "sampler" in self.class_type(n).lower()]
        self.sampler_ids = set(named or [n for n in self.graph if self._feeds_sampler(n) and
                                         is_link(self.get(n, "model"))])

    # ---- access --------------------------------------------------------------------------------------------

    def _step(self) -> None:
        self.steps += 1
        if self.steps > MAX_WALK_STEPS:
            raise OverBound("graph_too_large", f"walking the ComfyUI graph took over {MAX_WALK_STEPS} steps")

    def class_type(self, node_id: Any) -> str:
        return str((self.graph.get(str(node_id)) or {}).get("class_type", ""))

    def inputs(self, node_id: Any) -> dict[str, Any]:
        """A node's inputs with lower-case names (ComfyUI nodes spell them `text`, `Text`, `TEXT`)."""
        key = str(node_id)
        if key not in self._lower:
            raw = (self.graph.get(key) or {}).get("inputs")
            self._lower[key] = {str(k).lower(): v for k, v in raw.items()} if isinstance(raw, dict) else {}
        return self._lower[key]

    def get(self, node_id: Any, name: str) -> Any:
        return self.inputs(node_id).get(name)

    def _feeds_sampler(self, node_id: str) -> bool:
        if self.graph[node_id].get("mode") in (2, 4):  # muted / bypassed in the UI
            return False
        return is_link(self.get(node_id, "positive")) or is_link(self.get(node_id, "guider"))

    def _enter(self, key: Any, depth: int) -> bool:
        """Start visiting `key`: False when it is already on the path (a cycle). Counts a step."""
        if depth > _MAX_DEPTH:
            raise OverBound("graph_too_large", f"ComfyUI links nested deeper than {_MAX_DEPTH}")
        self._step()
        if key in self._active:
            return False
        self._active.add(key)
        return True

    # ---- values: strings, numbers, switches -------------------------------------------------------------

    def scalar(self, value: Any, depth: int = 0) -> Any:
        """A number/boolean/string input's value, following links to primitive nodes."""
        for _ in range(20):
            if not is_link(value):
                return value
            self._step()
            inputs = self.inputs(value[0])
            value = next((inputs[k] for k in _SCALAR_KEYS if k in inputs), None)
        return None

    def switch(self, node_id: str) -> Any | None:
        """The input a switch node passes on (resolved from its switch value), or None when it is no switch."""
        inputs = self.inputs(node_id)
        selector = next((inputs[k] for k in _SWITCH_KEYS if k in inputs), None)
        if "on_true" in inputs or "on_false" in inputs:
            return inputs.get("on_true" if self.scalar(selector) else "on_false")
        if isinstance(self.scalar(selector), int) and not isinstance(self.scalar(selector), bool):
            index = self.scalar(selector)
            for base in ("text", "input", "string", "option", "conditioning"):
                if f"{base}{index}" in inputs:
                    return inputs[f"{base}{index}"]
        anys = sorted(k for k in inputs if re.fullmatch(r"any_\d+", k) and is_link(inputs[k]))
        return inputs[anys[0]] if anys else None  # rgthree's Any Switch passes its first connected input

    def string(self, value: Any, depth: int = 0) -> str | Missing:
        """A string input's value, following links through primitives, reroutes, switches and concatenations."""
        if isinstance(value, str):
            return value
        if not is_link(value):
            return Missing("an input holds no text", runtime=False)
        key = (str(value[0]), value[1])
        if key in self._strings:
            return self._strings[key]
        if not self._enter(key, depth):
            return Missing(f"text links form a cycle at node {value[0]}", runtime=False)
        try:
            found = self._string_of(str(value[0]), depth)
        finally:
            self._active.discard(key)
        self._strings[key] = found
        return found

    def _string_of(self, node_id: str, depth: int) -> str | Missing:
        if node_id not in self.graph:
            return Missing(f"a link points to node {node_id}, which is not in the graph", runtime=False)
        inputs = self.inputs(node_id)
        kind = self.class_type(node_id)
        branch = self.switch(node_id)
        if branch is not None:
            return self.string(branch, depth + 1)
        parts = sorted((m.group(1).zfill(4), k) for k in inputs if (m := _CONCAT.fullmatch(k)))
        if parts and not any(k in inputs for k in ("text", "string")):
            texts = [self.string(inputs[k], depth + 1) for _, k in parts]
            missing = next((t for t in texts if isinstance(t, Missing)), None)
            if missing is not None:
                return missing
            delimiter = self.string(inputs.get("delimiter", inputs.get("separator", "")), depth + 1)
            return (delimiter if isinstance(delimiter, str) else "").join(t for t in texts if isinstance(t, str))
        made = Missing(f"its text comes out of {kind} (node {node_id}) at run time", runtime=True)
        if _GENERATORS.search(kind):  # an LLM, captioner or tagger: its inputs are instructions, not the text
            return made
        links = [v for v in inputs.values() if is_link(v)]
        named = next((inputs[k] for k in _STRING_KEYS if isinstance(inputs.get(k), str)), None)
        strings = [v for v in inputs.values() if isinstance(v, str)]
        if named is not None or (not links and len(strings) == 1):  # a primitive, a text box, a prompt node
            return named if named is not None else strings[0]
        if len(inputs) == 1 and links:  # a reroute, or a node that shows what passes through it
            return self.string(links[0], depth + 1)
        if not links:
            return Missing(f"{kind} (node {node_id}) holds no text", runtime=False)
        upstream = next((inputs[k] for k in _STRING_KEYS if is_link(inputs.get(k))), None)
        if upstream is not None:  # a node that transforms text: upstream may show the graph is broken
            found = self.string(upstream, depth + 1)
            if isinstance(found, Missing) and not found.runtime:
                return found
        return made

    # ---- conditioning --------------------------------------------------------------------------------------

    def texts(self, ref: Any, role: str, depth: int = 0) -> list[str] | Missing:
        """Prompt texts that reach a conditioning input (`role`: "positive" or "negative")."""
        if not is_link(ref):
            return []
        key = (str(ref[0]), ref[1], role)
        if key in self._texts:
            return self._texts[key]
        if ref[0] is None or self.class_type(ref[0]).lower() in _ZEROING or not self._enter(key, depth):
            return []
        try:
            found = self._texts_of(str(ref[0]), ref[1], role, depth)
        finally:
            self._active.discard(key)
        self._texts[key] = found
        return found

    def _texts_of(self, node_id: str, slot: int, role: str, depth: int) -> list[str] | Missing:
        inputs = self.inputs(node_id)
        keys = [k for k in TEXT_KEYS if k in inputs]
        if keys:  # a text encoder
            out: list[str] = []
            for k in keys:
                text = self.string(inputs[k], depth + 1)
                if isinstance(text, Missing):
                    if is_link(inputs[k]):
                        return Missing(f"the text of {self.class_type(node_id)} (node {node_id}): {text.detail}",
                                       text.runtime)
                    continue
                if text.strip():
                    out.append(text.strip())
            return _dedupe(out)
        if isinstance(inputs.get(role), str):  # loaders that take the prompt as a widget (Efficiency, easy-use)
            return [inputs[role].strip()] if inputs[role].strip() else []
        branch = self.switch(node_id)
        if branch is not None:
            return self.texts(branch, role, depth + 1)
        if is_link(inputs.get("positive")) and is_link(inputs.get("negative")):
            # e.g. ControlNetApplyAdvanced: output 0 carries the positive input, output 1 the negative
            return self.texts(inputs["positive" if slot == 0 else "negative"], role, depth + 1)
        links = [(k, v) for k, v in inputs.items() if is_link(v)]
        conditioning = [v for k, v in links if "cond" in k]
        found: list[str] = []
        for link in conditioning or [v for _, v in links]:
            more = self.texts(link, role, depth + 1)
            if isinstance(more, Missing):
                return more
            found += more
        return _dedupe(found)

    def conditioning(self, node_id: str) -> tuple[Any, Any, str]:
        """(positive ref, negative ref, node holding them) of a sampler, looking through a guider."""
        if is_link(self.get(node_id, "guider")):
            guider = str(self.get(node_id, "guider")[0])
            g = self.inputs(guider)
            return g.get("positive", g.get("conditioning", g.get("cond1"))), g.get("negative"), guider
        return self.get(node_id, "positive"), self.get(node_id, "negative"), node_id

    # ---- which sampler ---------------------------------------------------------------------------------------

    def line(self, start: str) -> list[str]:
        """The samplers on the image/latent line that ends at `start`, last pass first."""
        samplers: list[str] = []
        seen: set[str] = set()
        node: str | None = start
        while node is not None and node in self.graph and node not in seen:
            self._step()
            seen.add(node)
            inputs = self.inputs(node)
            if node in self.sampler_ids:
                samplers.append(node)
                nxt = next((inputs[k] for k in _SAMPLER_LATENT if is_link(inputs.get(k))), None)
            else:
                nxt = self.switch(node) or next((inputs[k] for k in _LINE_INPUTS if is_link(inputs.get(k))), None)
                links = [v for v in inputs.values() if is_link(v)]
                nxt = nxt if nxt is not None else (links[0] if len(links) == 1 else None)
            node = str(nxt[0]) if is_link(nxt) else None
        return samplers

    def lines(self) -> list[list[str]]:
        """Sampler lines to read, best first: the final image's line, else each sampler on its own."""
        best: tuple[tuple[bool, int], list[str]] | None = None
        for node_id in sorted(self.graph, key=_id_key):
            kind = self.class_type(node_id).lower()
            if self.graph[node_id].get("mode") in (2, 4) or not ("save" in kind or "preview" in kind):
                continue
            if not any(is_link(self.get(node_id, k)) for k in ("images", "image")):
                continue
            samplers = self.line(node_id)
            rank = ("save" in kind, len(samplers))
            if samplers and (best is None or rank > best[0]):
                best = (rank, samplers)
        if best is not None:
            return [best[1]]
        ordered = sorted(self.sampler_ids, key=lambda n: (self._empty_latent(n) is None, _id_key(n)))
        return [[n] for n in ordered]

    def _empty_latent(self, node_id: str) -> str | None:
        ref = next((self.get(node_id, k) for k in _SAMPLER_LATENT if is_link(self.get(node_id, k))), None)
        for _ in range(10):
            if not is_link(ref):
                return None
            self._step()
            kind = self.class_type(ref[0]).lower()
            if "empty" in kind and "latent" in kind:
                return str(ref[0])
            if "sampler" in kind:
                return None
            ref = next((v for v in self.inputs(ref[0]).values() if is_link(v)), None)
        return None

    # ---- settings -----------------------------------------------------------------------------------------------

    def meta(self, node_id: str) -> dict[str, Any]:
        """Settings of a sampling pass: seed, steps, cfg, sampler, scheduler, denoise, model, LoRAs, size."""
        meta: dict[str, Any] = {"tool": "comfyui"}
        holder = self.conditioning(node_id)[2]
        inputs = self.inputs(node_id)
        linked = [str(inputs[k][0]) for k in ("noise", "sigmas", "sampler") if is_link(inputs.get(k))]
        for nid in (node_id, holder, *linked):
            for key, name in _META_KEYS.items():
                value = self.scalar(self.get(nid, key))
                if name not in meta and isinstance(value, int | float | str) and not isinstance(value, bool):
                    meta[name] = value
        self._model(self.get(holder, "model") or inputs.get("model"), meta)
        latent = self._empty_latent(node_id)
        if latent is not None:
            size = parse_size(self.get(latent, "dimensions"))  # rgthree's SDXL latent: "1216 x 832 (landscape)"
            for key, value in zip(("width", "height"), size or (), strict=False):
                meta[key] = value
            for key in ("width", "height"):
                value = self.scalar(self.get(latent, key))
                if isinstance(value, int) and not isinstance(value, bool):
                    meta[key] = value
        return meta

    def _model(self, ref: Any, meta: dict[str, Any]) -> None:
        loras: list[dict[str, Any]] = []
        seen: set[str] = set()
        while is_link(ref) and str(ref[0]) not in seen and len(seen) < 50:
            self._step()
            seen.add(str(ref[0]))
            inputs = self.inputs(ref[0])
            if isinstance(inputs.get("lora_name"), str):
                loras.append({"name": inputs["lora_name"], "strength": self.scalar(inputs.get("strength_model"))})
            model = next((inputs[k] for k in _MODEL_KEYS if isinstance(inputs.get(k), str)), None)
            if model is not None:
                meta["model"] = model
                break
            ref = inputs.get("model") if "model" in inputs else self.switch(str(ref[0]))
        if "model" not in meta:  # unusual wiring: fall back to the first checkpoint loader
            for node_id in sorted(self.graph, key=_id_key):
                model = next((v for k in _MODEL_KEYS if isinstance(v := self.get(node_id, k), str)), None)
                if model is not None:
                    meta["model"] = model
                    break
        if loras:
            meta["loras"] = loras


def read_api_graph(graph: Any) -> Reading | None:
    """The prompt of a ComfyUI API graph (see the module docstring), why there is none, or None: not a graph."""
    if not isinstance(graph, dict) or not any(isinstance(v, dict) and "class_type" in v for v in graph.values()):
        return None
    walker = _Walker({k: v for k, v in graph.items() if isinstance(v, dict) and "class_type" in v})
    for line in walker.lines():
        first = line[-1]
        for node_id in line:
            positive, negative, _ = walker.conditioning(node_id)
            found = walker.texts(positive, "positive")
            if isinstance(found, Missing):
                reason = "prompt_not_stored" if found.runtime else "no_prompt"
                return NoPrompt(reason, f"ComfyUI sampler {node_id}: {found.detail}", reader="comfyui",
                                gen_meta=_meta(walker.meta(first)))
            if found:
                negatives = walker.texts(negative, "negative")
                negatives = [] if isinstance(negatives, Missing) else negatives
                return PromptInfo(", ".join(found), ", ".join(negatives) or None, _meta(walker.meta(first)),
                                  reader="comfyui")
    return NoPrompt("no_prompt", "ComfyUI graph: no sampler's positive input reaches a text", reader="comfyui")


def _meta(found: dict[str, Any]) -> dict[str, Any]:
    """The walker's settings under the common gen_meta names."""
    meta = normalise_meta(found, "comfyui", keep_source=False)
    if found.get("loras"):
        meta["loras"] = found["loras"]
    return meta


def read_workflow(workflow: Any) -> Reading | None:
    """The prompt of a ComfyUI UI workflow, read as its API graph."""
    return read_api_graph(workflow_to_graph(workflow))


def parse_api_graph(graph: Any) -> tuple[str, str | None, dict[str, Any]] | None:
    """(prompt, negative prompt, gen_meta) from a ComfyUI API graph, or None when no sampler has a prompt."""
    found = read_api_graph(graph)
    return (found.prompt, found.negative_prompt, found.gen_meta) if isinstance(found, PromptInfo) else None


def parse_workflow(workflow: Any) -> tuple[str, str | None, dict[str, Any]] | None:
    """(prompt, negative prompt, gen_meta) from a ComfyUI UI workflow, or None."""
    return parse_api_graph(workflow_to_graph(workflow))
