"""Prompts from ComfyUI graphs: the API `prompt` graph and the UI `workflow` graph that ComfyUI embeds in PNGs.

The API graph maps node id -> {"class_type", "inputs"}; an input is a literal or a link `[node_id, output_index]`.
The prompt is the text of the encoder node(s) reaching a sampler's `positive` input (its `negative` input gives
the negative prompt), following conditioning nodes (combine, area, ControlNet, ...), reroutes and string
primitives on the way. The UI graph (nodes with positional `widgets_values` and a link table) is converted into
an API-like graph first, with widget names for the common core nodes.
"""

from __future__ import annotations

from typing import Any

Graph = dict[str, dict[str, Any]]

TEXT_KEYS = ("text", "text_g", "text_l", "clip_l", "t5xxl")
_STRING_KEYS = ("text", "string", "value", "prompt")
_SCALAR_KEYS = ("value", "seed", "noise_seed", "int", "float", "number")
_ZEROING = {"ConditioningZeroOut"}  # outputs empty conditioning: its input is not the negative prompt
_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
_META_KEYS = {
    "seed": "seed",
    "noise_seed": "seed",
    "steps": "steps",
    "cfg": "cfg",
    "sampler_name": "sampler",
    "scheduler": "scheduler",
    "denoise": "denoise",
}
_MODEL_KEYS = ("ckpt_name", "unet_name")
_CONTROL = None  # placeholder for the UI-only `control_after_generate` widget

# Widget order of core nodes in UI workflows (`widgets_values` is positional).
WIDGETS: dict[str, list[str | None]] = {
    "KSampler": ["seed", _CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "KSamplerAdvanced": [
        "add_noise", "noise_seed", _CONTROL, "steps", "cfg", "sampler_name", "scheduler",
        "start_at_step", "end_at_step", "return_with_leftover_noise",
    ],
    "CheckpointLoaderSimple": ["ckpt_name"],
    "CheckpointLoader": ["config_name", "ckpt_name"],
    "UNETLoader": ["unet_name", "weight_dtype"],
    "LoraLoader": ["lora_name", "strength_model", "strength_clip"],
    "LoraLoaderModelOnly": ["lora_name", "strength_model"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "RandomNoise": ["noise_seed", _CONTROL],
    "KSamplerSelect": ["sampler_name"],
    "BasicScheduler": ["scheduler", "steps", "denoise"],
    "CFGGuider": ["cfg"],
    "CLIPTextEncode": ["text"],
    "CLIPTextEncodeSDXL": ["width", "height", "crop_w", "crop_h", "target_width", "target_height", "text_g", "text_l"],
    "CLIPTextEncodeSDXLRefiner": ["ascore", "width", "height", "text"],
    "CLIPTextEncodeFlux": ["clip_l", "t5xxl", "guidance"],
    "PrimitiveNode": ["value", _CONTROL],
}


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


def _checkpoint(inputs: dict[str, Any]) -> str | None:
    return next((inputs[k] for k in _MODEL_KEYS if isinstance(inputs.get(k), str)), None)


class _Walker:
    def __init__(self, graph: Graph) -> None:
        self.graph = {str(k): v for k, v in graph.items() if isinstance(v, dict)}

    def class_type(self, node_id: Any) -> str:
        return str((self.graph.get(str(node_id)) or {}).get("class_type", ""))

    def inputs(self, node_id: Any) -> dict[str, Any]:
        inputs = (self.graph.get(str(node_id)) or {}).get("inputs")
        return inputs if isinstance(inputs, dict) else {}

    def string(self, value: Any, depth: int = 0) -> str | None:
        """A string input's value, following links through primitives, reroutes and concatenations."""
        if isinstance(value, str):
            return value
        if not is_link(value) or depth > 20:
            return None
        inputs = self.inputs(value[0])
        for key in _STRING_KEYS:
            if key in inputs and (found := self.string(inputs[key], depth + 1)) is not None:
                return found
        links = [v for v in inputs.values() if is_link(v)]
        if len(inputs) == 1 and links:  # a reroute
            return self.string(links[0], depth + 1)
        parts = [
            s for k, v in sorted(inputs.items())
            if k.startswith(("string_", "text_")) and (s := self.string(v, depth + 1))
        ]
        delimiter = inputs.get("delimiter")
        return (delimiter if isinstance(delimiter, str) else ", ").join(parts) if parts else None

    def scalar(self, value: Any, depth: int = 0) -> Any:
        """A number/string input's value, following links to primitive nodes."""
        if not is_link(value):
            return value
        if depth > 20:
            return None
        inputs = self.inputs(value[0])
        for key in _SCALAR_KEYS:
            if key in inputs:
                return self.scalar(inputs[key], depth + 1)
        return None

    def texts(self, ref: Any, seen: set[tuple[str, int]] | None = None) -> list[str]:
        """Prompt texts that reach a conditioning input."""
        seen = set() if seen is None else seen
        if not is_link(ref) or len(seen) > 500:
            return []
        key = (str(ref[0]), ref[1])
        if key in seen or self.class_type(ref[0]) in _ZEROING:
            return []
        seen.add(key)
        inputs = self.inputs(ref[0])
        found = [s.strip() for k in TEXT_KEYS if k in inputs and (s := self.string(inputs[k])) and s.strip()]
        if found:
            return _dedupe(found)
        if is_link(inputs.get("positive")) and is_link(inputs.get("negative")):
            # e.g. ControlNetApplyAdvanced: output 0 carries the positive input, output 1 the negative
            return self.texts(inputs["positive" if ref[1] == 0 else "negative"], seen)
        links = [(k, v) for k, v in inputs.items() if is_link(v)]
        conditioning = [v for k, v in links if "cond" in k.lower()]
        out: list[str] = []
        for link in conditioning or [v for _, v in links]:
            out += self.texts(link, seen)
        return _dedupe(out)

    def samplers(self) -> list[str]:
        """Sampler node ids, first-pass samplers (fed by an empty latent) first, then by id."""
        named, generic = [], []
        for node_id, node in self.graph.items():
            if node.get("mode") in (2, 4):  # muted / bypassed in the UI
                continue
            inputs = self.inputs(node_id)
            if is_link(inputs.get("positive")) or is_link(inputs.get("guider")):
                if "sampler" in str(node.get("class_type", "")).lower():
                    named.append(node_id)
                elif is_link(inputs.get("model")):
                    generic.append(node_id)
        found = named or generic
        return sorted(found, key=lambda n: (not self._from_empty_latent(n), _id_key(n)))

    def _from_empty_latent(self, node_id: str) -> bool:
        return self._empty_latent(node_id) is not None

    def _empty_latent(self, node_id: str) -> str | None:
        inputs = self.inputs(node_id)
        ref = inputs.get("latent_image", inputs.get("latent"))
        for _ in range(10):
            if not is_link(ref):
                return None
            kind = self.class_type(ref[0]).lower()
            if "empty" in kind and "latent" in kind:
                return str(ref[0])
            if "sampler" in kind:
                return None
            ref = next((v for v in self.inputs(ref[0]).values() if is_link(v)), None)
        return None

    def conditioning(self, node_id: str) -> tuple[Any, Any, str]:
        """(positive ref, negative ref, node holding them) of a sampler, looking through a guider."""
        inputs = self.inputs(node_id)
        if is_link(inputs.get("guider")):
            guider = str(inputs["guider"][0])
            g = self.inputs(guider)
            return g.get("positive", g.get("conditioning", g.get("cond1"))), g.get("negative"), guider
        return inputs.get("positive"), inputs.get("negative"), node_id

    def meta(self, node_id: str, holder: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"tool": "comfyui"}
        inputs = self.inputs(node_id)
        linked = [str(inputs[k][0]) for k in ("noise", "sigmas", "sampler") if is_link(inputs.get(k))]
        nodes = [node_id, holder, *linked]
        for nid in nodes:
            for key, name in _META_KEYS.items():
                value = self.scalar(self.inputs(nid).get(key))
                if name not in meta and isinstance(value, int | float | str) and not isinstance(value, bool):
                    meta[name] = value
        self._model(self.inputs(holder).get("model", inputs.get("model")), meta)
        latent = self._empty_latent(node_id)
        if latent is not None:
            for key in ("width", "height"):
                value = self.scalar(self.inputs(latent).get(key))
                if isinstance(value, int) and not isinstance(value, bool):
                    meta[key] = value
        return meta

    def _model(self, ref: Any, meta: dict[str, Any]) -> None:
        loras: list[dict[str, Any]] = []
        for _ in range(50):
            if not is_link(ref):
                break
            inputs = self.inputs(ref[0])
            if isinstance(inputs.get("lora_name"), str):
                loras.append({"name": inputs["lora_name"], "strength": self.scalar(inputs.get("strength_model"))})
            model = _checkpoint(inputs)
            if model is not None:
                meta["model"] = model
                break
            ref = inputs.get("model")
        if "model" not in meta:  # unusual wiring: fall back to the first checkpoint loader
            for node_id in sorted(self.graph, key=_id_key):
                model = _checkpoint(self.inputs(node_id))
                if model is not None:
                    meta["model"] = model
                    break
        if loras:
            meta["loras"] = loras


def parse_api_graph(graph: Any) -> tuple[str, str | None, dict[str, Any]] | None:
    """(prompt, negative prompt, gen_meta) from a ComfyUI API graph, or None when no sampler has a prompt."""
    if not isinstance(graph, dict):
        return None
    walker = _Walker(graph)
    for node_id in walker.samplers():
        positive, negative, holder = walker.conditioning(node_id)
        texts = walker.texts(positive)
        if texts:
            negatives = walker.texts(negative)
            return ", ".join(texts), (", ".join(negatives) or None), walker.meta(node_id, holder)
    return None


def _links(workflow: dict[str, Any]) -> dict[int, tuple[Any, int]]:
    """link id -> (origin node id, origin slot), for both the list and the object link formats."""
    out: dict[int, tuple[Any, int]] = {}
    for link in workflow.get("links") or []:
        if isinstance(link, list) and len(link) >= 5:
            out[link[0]] = (link[1], link[2])
        elif isinstance(link, dict) and "id" in link:
            out[link["id"]] = (link.get("origin_id"), link.get("origin_slot", 0))
    return out


def _widget_inputs(node: dict[str, Any]) -> dict[str, Any]:
    """Name the positional `widgets_values` of a UI node."""
    values = node.get("widgets_values")
    if isinstance(values, dict):
        return dict(values)
    if not isinstance(values, list):
        return {}
    kind = str(node.get("type", ""))
    names = WIDGETS.get(kind)
    if names is None:
        # newer UIs list every widget among the inputs, in widget order
        slots = [i for i in node.get("inputs") or [] if isinstance(i, dict) and isinstance(i.get("widget"), dict)]
        names = [slot["widget"].get("name") for slot in slots]
        if not names and "textencode" in kind.lower():
            strings = [v for v in values if isinstance(v, str) and v.strip()]
            return {"text": strings[0]} if strings else {}
    out: dict[str, Any] = {}
    values = list(values)
    for name in names:
        if not values:
            break
        if name is _CONTROL:
            if values[0] in _CONTROL_VALUES:
                values.pop(0)
            continue
        out[name] = values.pop(0)
        if name in ("seed", "noise_seed") and values and values[0] in _CONTROL_VALUES and _CONTROL not in names:
            values.pop(0)
    return out


def workflow_to_graph(workflow: Any) -> Graph:
    """An API-like graph from a ComfyUI UI workflow (`nodes` + `links`)."""
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        return {}
    links = _links(workflow)
    graph: Graph = {}
    for node in workflow["nodes"]:
        if not isinstance(node, dict) or "id" not in node:
            continue
        inputs = _widget_inputs(node)
        for slot in node.get("inputs") or []:
            if isinstance(slot, dict) and slot.get("link") in links:
                origin, origin_slot = links[slot["link"]]
                inputs[str(slot.get("name", ""))] = [str(origin), int(origin_slot or 0)]
        graph[str(node["id"])] = {"class_type": node.get("type", ""), "inputs": inputs, "mode": node.get("mode", 0)}
    return graph


def parse_workflow(workflow: Any) -> tuple[str, str | None, dict[str, Any]] | None:
    """(prompt, negative prompt, gen_meta) from a ComfyUI UI workflow, or None."""
    return parse_api_graph(workflow_to_graph(workflow))
