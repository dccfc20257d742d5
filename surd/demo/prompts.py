"""Realistic prompt text for the demo data: keyword prompts, A1111 infotext, ComfyUI graphs."""

from __future__ import annotations

import json
import random
from typing import Any

QUALITY = ["masterpiece", "best quality", "ultra detailed", "8k", "highres", "absurdres", "sharp focus",
           "intricate details", "photorealistic", "hdr", "extremely detailed CG unity 8k wallpaper"]
STYLES = ["digital painting", "concept art", "octane render", "unreal engine 5", "trending on artstation",
          "cinematic lighting", "volumetric lighting", "oil painting", "matte painting", "isometric", "bokeh",
          "film grain", "35mm photograph", "depth of field", "god rays", "rim lighting"]
ARTISTS = ["greg rutkowski", "alphonse mucha", "artgerm", "wlop", "makoto shinkai", "james gurney",
           "simon stalenhag", "moebius", "ilya kuvshinov", "craig mullins"]
LORAS = [("add_detail", "7c6bad76eb54"), ("epiNoiseoffset_v2", "d1131f7207d6"), ("more_details", "3b8aa1d351ef"),
         ("film_grain_v1", "a2b3c4d5e6f7")]
NEGATIVES = ["lowres", "bad anatomy", "bad hands", "text", "error", "missing fingers", "extra digit", "cropped",
             "(worst quality:1.4)", "(low quality:1.4)", "normal quality", "jpeg artifacts", "signature",
             "watermark", "username", "blurry", "easynegative", "deformed", "ugly", "(nsfw:1.3)"]
SAMPLERS = ["Euler a", "Euler", "DPM++ 2M Karras", "DPM++ SDE Karras", "DDIM", "UniPC"]
COMFY_SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_sde", "ddim", "uni_pc"]
MODELS = [("v1-5-pruned-emaonly", "6ce0161689"), ("dreamshaper_8", "879db523c3"),
          ("realisticVisionV51_v51VAE", "15012c538f"), ("revAnimated_v122", "4199bcdd14")]

# theme -> (keywords, the simple narrative it shows)
THEMES: dict[str, tuple[list[str], str]] = {
    "city": (["cyberpunk city", "neon lights", "rainy street", "flying cars", "holographic billboards",
              "reflections on wet asphalt", "night"], "A city street at night, lit by neon signs."),
    "mountains": (["snowy mountains", "sunrise", "alpine lake", "pine trees", "mist", "epic landscape",
                   "golden hour"], "Snowy mountains above a lake at sunrise."),
    "ocean": (["stormy ocean", "sailing ship", "huge waves", "dramatic sky", "sea spray", "lighthouse"],
              "A sailing ship on a stormy sea."),
    "forest": (["enchanted forest", "glowing mushrooms", "fireflies", "ancient trees", "moss", "fog",
                "fantasy"], "A misty forest with glowing mushrooms."),
    "portrait": (["portrait of a young woman", "freckles", "detailed eyes", "red hair", "soft smile",
                  "looking at viewer", "upper body"], "A portrait of a smiling woman with red hair."),
    "space": (["ringed planet", "nebula", "starfield", "spaceship", "cosmic", "sci-fi", "deep space"],
              "A ringed planet floating in space among stars."),
    "abstract": (["abstract geometric shapes", "bauhaus", "bold colors", "minimalism", "circles",
                  "poster art"], "Bold geometric shapes in bright colours."),
    "desert": (["desert dunes", "lone traveler", "camel caravan", "heat haze", "blazing sun", "sand"],
               "A caravan crossing desert dunes under the sun."),
    "flowers": (["field of sunflowers", "blue sky", "summer", "butterflies", "vibrant", "countryside"],
                "A field of sunflowers under a blue sky."),
    "interior": (["cozy library", "bookshelves", "fireplace", "warm light", "armchair", "rainy window"],
                 "A cozy library with a fireplace."),
}
UNICODE_EXTRA = ["café terrace", "夜景", "über detailed"]


def _weighted(word: str, rng: random.Random) -> str:
    form = rng.randrange(4)
    if form == 0:
        return f"({word}:{rng.choice(['1.1', '1.2', '1.3', '0.8'])})"
    if form == 1:
        return f"(({word}))"
    if form == 2:
        return f"[{word}]"
    return word


def keyword_prompt(theme: str, rng: random.Random, *, multiline: bool = False, unicode: bool = False) -> str:
    """A keyword-style prompt: quality tags, weighted subject words, styles, an artist, sometimes a LoRA."""
    words = THEMES[theme][0]
    parts = rng.sample(QUALITY, 2) + [_weighted(w, rng) for w in rng.sample(words, 4)]
    parts += rng.sample(STYLES, 2) + [f"art by {rng.choice(ARTISTS)}"]
    if unicode:
        parts += UNICODE_EXTRA
    if rng.random() < 0.4:
        parts.append(f"<lora:{rng.choice(LORAS)[0]}:{rng.choice(['0.5', '0.7', '0.8'])}>")
    if multiline:
        half = len(parts) // 2
        return ", ".join(parts[:half]) + ",\n" + ", ".join(parts[half:])
    return ", ".join(parts)


def long_prompt(rng: random.Random, min_chars: int = 1400) -> str:
    parts: list[str] = []
    while len(", ".join(parts)) < min_chars:
        theme = rng.choice(sorted(THEMES))
        parts += rng.sample(THEMES[theme][0], 2) + rng.sample(STYLES, 1)
    return ", ".join(parts)


def negative_prompt(rng: random.Random) -> str:
    return ", ".join(rng.sample(NEGATIVES, 8))


def narrative_for(theme: str, rng: random.Random) -> str:
    return THEMES[theme][1]


def _quote(value: Any) -> str:
    """A1111's infotext quoting: JSON-quote values containing separators."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


def infotext(prompt: str, negative: str | None, rng: random.Random, size: tuple[int, int], *,
             loras: bool = False) -> str:
    """AUTOMATIC1111 "parameters" text, as `modules.processing.create_infotext` writes it."""
    model, model_hash = rng.choice(MODELS)
    params: dict[str, Any] = {
        "Steps": rng.choice([20, 25, 28, 30, 40]),
        "Sampler": rng.choice(SAMPLERS),
        "CFG scale": rng.choice([5, 6, 7, 7.5, 8]),
        "Seed": rng.randrange(2**32),
        "Size": f"{size[0]}x{size[1]}",
        "Model hash": model_hash,
        "Model": model,
    }
    if rng.random() < 0.3:
        params["Clip skip"] = 2
    if loras:
        params["Lora hashes"] = ", ".join(f"{name}: {h}" for name, h in LORAS[:2])
    params["Version"] = "v1.7.0"
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in params.items()))
    return "\n".join(lines)


def comfy_graphs(prompt: str, negative: str, rng: random.Random, size: tuple[int, int], *,
                 lora: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(API `prompt` graph, UI `workflow`) of ComfyUI's default text-to-image graph, optionally with a LoRA."""
    seed, steps, cfg = rng.randrange(2**48), rng.choice([20, 25, 30]), rng.choice([6.0, 7.0, 8.0])
    sampler = rng.choice(COMFY_SAMPLERS)
    ckpt = rng.choice(MODELS)[0] + ".safetensors"
    model_src, clip_src = ("4", 0), ("4", 1)
    # (id, class, widgets (name -> value, in widget order), link inputs (name, type, (src id, slot)), outputs)
    nodes: list[tuple[str, str, dict[str, Any], list[tuple[str, str, tuple[str, int]]], list[tuple[str, str]]]] = [
        ("4", "CheckpointLoaderSimple", {"ckpt_name": ckpt}, [],
         [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    ]
    if lora:
        name = rng.choice(LORAS)[0] + ".safetensors"
        widgets = {"lora_name": name, "strength_model": 0.7, "strength_clip": 0.7}
        links = [("model", "MODEL", model_src), ("clip", "CLIP", clip_src)]
        nodes.append(("10", "LoraLoader", widgets, links, [("MODEL", "MODEL"), ("CLIP", "CLIP")]))
        model_src, clip_src = ("10", 0), ("10", 1)
    nodes += [
        ("5", "EmptyLatentImage", {"width": size[0], "height": size[1], "batch_size": 1}, [], [("LATENT", "LATENT")]),
        ("6", "CLIPTextEncode", {"text": prompt}, [("clip", "CLIP", clip_src)], [("CONDITIONING", "CONDITIONING")]),
        ("7", "CLIPTextEncode", {"text": negative}, [("clip", "CLIP", clip_src)], [("CONDITIONING", "CONDITIONING")]),
        ("3", "KSampler",
         {"seed": seed, "control_after_generate": "randomize", "steps": steps, "cfg": cfg, "sampler_name": sampler,
          "scheduler": "karras", "denoise": 1.0},
         [("model", "MODEL", model_src), ("positive", "CONDITIONING", ("6", 0)),
          ("negative", "CONDITIONING", ("7", 0)), ("latent_image", "LATENT", ("5", 0))], [("LATENT", "LATENT")]),
        ("8", "VAEDecode", {}, [("samples", "LATENT", ("3", 0)), ("vae", "VAE", ("4", 2))], [("IMAGE", "IMAGE")]),
        ("9", "SaveImage", {"filename_prefix": "ComfyUI"}, [("images", "IMAGE", ("8", 0))], []),
    ]
    graph = {
        nid: {"inputs": {**{k: v for k, v in widgets.items() if k != "control_after_generate"},
                         **{name: [src[0], src[1]] for name, _, src in links}}, "class_type": kind}
        for nid, kind, widgets, links, _ in nodes
    }
    link_table: list[list[Any]] = []
    outputs: dict[tuple[str, int], list[int]] = {}
    ui_nodes = []
    for order, (nid, kind, widgets, links, outs) in enumerate(nodes):
        inputs = []
        for slot, (name, typ, src) in enumerate(links):
            link_id = len(link_table) + 1
            link_table.append([link_id, int(src[0]), src[1], int(nid), slot, typ])
            outputs.setdefault(src, []).append(link_id)
            inputs.append({"name": name, "type": typ, "link": link_id})
        ui_nodes.append({
            "id": int(nid), "type": kind, "pos": [100 + 300 * order, 100], "size": [315, 98], "flags": {},
            "order": order, "mode": 0, "inputs": inputs, "properties": {"Node name for S&R": kind},
            "widgets_values": list(widgets.values()), "_outs": outs,
        })
    for node in ui_nodes:
        outs = node.pop("_outs")
        node["outputs"] = [{"name": n, "type": t, "links": outputs.get((str(node["id"]), i), []), "slot_index": i}
                           for i, (n, t) in enumerate(outs)]
    workflow = {"last_node_id": max(int(n[0]) for n in nodes), "last_link_id": len(link_table), "nodes": ui_nodes,
                "links": link_table, "groups": [], "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}},
                "version": 0.4}
    return graph, workflow
