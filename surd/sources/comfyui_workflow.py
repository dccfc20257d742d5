"""ComfyUI's UI `workflow` (nodes with positional `widgets_values`, a link table) as an API-like graph.

Subgraphs (`definitions.subgraphs`, ComfyUI >= 0.3.4x) are expanded the way ComfyUI expands them when it
queues a prompt: an instance node `N` of subgraph `S` is replaced by S's nodes under ids `N:<inner id>`; a
link from S's input node (-10) takes the instance's input (its outer link, or its promoted widget value); a
link into S's output node (-20) is where the instance's outputs come from. Nesting is followed to
`_MAX_NESTING` levels, and the flattened graph is bounded by `MAX_GRAPH_NODES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from surd.sources.bounds import MAX_GRAPH_NODES, OverBound

Graph = dict[str, dict[str, Any]]

_CONTROL = None  # placeholder for the UI-only `control_after_generate` widget
_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
_INPUT_NODE, _OUTPUT_NODE = -10, -20
_MAX_NESTING = 8

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


def _links(links: Any) -> dict[Any, tuple[Any, int]]:
    """link id -> (origin node id, origin slot), for both the list and the object link formats."""
    out: dict[Any, tuple[Any, int]] = {}
    for link in links if isinstance(links, list) else []:
        if isinstance(link, list) and len(link) >= 5:
            out[link[0]] = (link[1], link[2] if isinstance(link[2], int) else 0)
        elif isinstance(link, dict) and "id" in link:
            slot = link.get("origin_slot", 0)
            out[link["id"]] = (link.get("origin_id"), slot if isinstance(slot, int) else 0)
    return out


def _output_links(links: Any) -> dict[int, tuple[Any, int]]:
    """Output slot of a subgraph -> the (inner node id, slot) feeding it."""
    out: dict[int, tuple[Any, int]] = {}
    for link in links if isinstance(links, list) else []:
        if isinstance(link, list) and len(link) >= 5 and link[3] == _OUTPUT_NODE:
            out[link[4]] = (link[1], link[2])
        elif isinstance(link, dict) and link.get("target_id") == _OUTPUT_NODE:
            out[link.get("target_slot", 0)] = (link.get("origin_id"), link.get("origin_slot", 0))
    return out


def widget_inputs(node: dict[str, Any]) -> dict[str, Any]:
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


@dataclass
class _Scope:
    """One level of a workflow: its nodes, its link table, the id prefix of its nodes, what its inputs deliver."""

    by_id: dict[str, dict[str, Any]]
    table: dict[Any, tuple[Any, int]]
    prefix: str
    outer: Callable[[int], Any]
    depth: int


class _Flattener:
    def __init__(self, workflow: dict[str, Any]) -> None:
        definitions = workflow.get("definitions")
        subgraphs = definitions.get("subgraphs") if isinstance(definitions, dict) else None
        self.subgraphs = {sg["id"]: sg for sg in subgraphs or [] if isinstance(sg, dict) and "id" in sg}
        self.graph: Graph = {}
        self.expanded: dict[str, _Scope] = {}

    def scope(self, nodes: Any, links: Any, prefix: str, outer: Callable[[int], Any], depth: int) -> _Scope:
        """Add one level's nodes under `prefix`; `outer(slot)` is what this level's input node delivers."""
        if depth > _MAX_NESTING:
            raise OverBound("graph_too_large", f"ComfyUI subgraphs nested deeper than {_MAX_NESTING}")
        nodes = [n for n in nodes if isinstance(n, dict) and "id" in n] if isinstance(nodes, list) else []
        level = _Scope({str(n["id"]): n for n in nodes}, _links(links), prefix, outer, depth)
        for node in nodes:
            if node.get("type") in self.subgraphs:
                self.instance(node, level)
                continue
            inputs = widget_inputs(node)
            for slot in node.get("inputs") or []:
                if isinstance(slot, dict) and slot.get("link") in level.table:
                    value = self.value(level.table[slot["link"]], level)
                    if value is not None:
                        inputs[str(slot.get("name", ""))] = value
            if len(self.graph) >= MAX_GRAPH_NODES:
                raise OverBound("graph_too_large", f"ComfyUI workflow with more than {MAX_GRAPH_NODES} nodes")
            self.graph[prefix + str(node["id"])] = {
                "class_type": node.get("type", ""), "inputs": inputs, "mode": node.get("mode", 0)}
        return level

    def value(self, origin: tuple[Any, int], level: _Scope) -> Any:
        """What a link delivers: a link into the flattened graph, or a literal from a subgraph's inputs."""
        node_id, slot = origin
        if node_id == _INPUT_NODE:
            return level.outer(slot)
        node = level.by_id.get(str(node_id))
        if node is None or node.get("type") not in self.subgraphs:
            return [level.prefix + str(node_id), slot]
        inner = self.instance(node, level)
        source = _output_links(self.subgraphs[node["type"]].get("links")).get(slot)
        return None if source is None or source[0] == _OUTPUT_NODE else self.value(source, inner)

    def instance(self, node: dict[str, Any], level: _Scope) -> _Scope:
        """The inner level of a subgraph instance, its nodes added to the graph the first time."""
        prefix = f"{level.prefix}{node['id']}:"
        if prefix in self.expanded:
            return self.expanded[prefix]
        slots = [s for s in node.get("inputs") or [] if isinstance(s, dict)]
        widgets = widget_inputs(node)

        def delivered(index: int) -> Any:
            if not isinstance(index, int) or not 0 <= index < len(slots):
                return None
            link = slots[index].get("link")
            if link in level.table:
                return self.value(level.table[link], level)
            return widgets.get(str(slots[index].get("name", "")))

        subgraph = self.subgraphs[node["type"]]
        self.expanded[prefix] = _Scope({}, {}, prefix, delivered, level.depth + 1)  # a self-nesting stops here
        self.expanded[prefix] = self.scope(subgraph.get("nodes"), subgraph.get("links"), prefix, delivered,
                                           level.depth + 1)
        return self.expanded[prefix]


def workflow_to_graph(workflow: Any) -> Graph:
    """An API-like graph from a ComfyUI UI workflow (`nodes` + `links`, subgraphs expanded)."""
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        return {}
    flat = _Flattener(workflow)
    flat.scope(workflow["nodes"], workflow.get("links"), "", lambda slot: None, 0)
    return flat.graph
