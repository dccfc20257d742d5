"""Embedded-prompt parsers on files written the way AUTOMATIC1111, Forge, ComfyUI and piexif write them."""

from __future__ import annotations

import copy
import io
import json
import zlib

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from surd.sources import comfyui, metadata
from surd.sources.metadata import parse_infotext, read_embedded, read_sidecar_json, read_sidecar_txt

A1111 = (
    "masterpiece, best quality, (cyberpunk city:1.2), neon lights,\n"
    "rainy street, <lora:add_detail:0.7>, art by greg rutkowski\n"
    "Negative prompt: lowres, bad anatomy,\n"
    "(worst quality:1.4), watermark\n"
    'Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 3735928559, Size: 512x768, Model hash: 6ce0161689, '
    'Model: v1-5-pruned-emaonly, Lora hashes: "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef", '
    "Version: v1.7.0"
)

# ComfyUI's default text-to-image graph as "Save (API format)" writes it, and as the PNG `prompt` chunk holds it.
COMFY_API = {
    "3": {"inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
                     "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                     "latent_image": ["5", 0]}, "class_type": "KSampler", "_meta": {"title": "KSampler"}},
    "4": {"inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, "class_type": "CheckpointLoaderSimple"},
    "5": {"inputs": {"width": 512, "height": 512, "batch_size": 1}, "class_type": "EmptyLatentImage"},
    "6": {"inputs": {"text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
                     "clip": ["4", 1]}, "class_type": "CLIPTextEncode"},
    "7": {"inputs": {"text": "text, watermark", "clip": ["4", 1]}, "class_type": "CLIPTextEncode"},
    "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode"},
    "9": {"inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}, "class_type": "SaveImage"},
}


def _node(nid, kind, inputs, outputs, widgets=None, mode=0):
    return {"id": nid, "type": kind, "pos": [0, 0], "size": [315, 98], "flags": {}, "order": 0, "mode": mode,
            "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": kind},
            "widgets_values": widgets if widgets is not None else []}


def _in(name, typ, link, widget=None):
    slot = {"name": name, "type": typ, "link": link}
    if widget:
        slot["widget"] = {"name": widget}
    return slot


def _out(name, typ, links):
    return {"name": name, "type": typ, "links": links, "slot_index": 0}


# The same default graph as the UI `workflow` chunk holds it (widgets positional, links as a table).
COMFY_WORKFLOW = {
    "last_node_id": 9, "last_link_id": 9,
    "nodes": [
        _node(7, "CLIPTextEncode", [_in("clip", "CLIP", 5)], [_out("CONDITIONING", "CONDITIONING", [6])],
              ["text, watermark"]),
        _node(6, "CLIPTextEncode", [_in("clip", "CLIP", 3)], [_out("CONDITIONING", "CONDITIONING", [4])],
              ["beautiful scenery nature glass bottle landscape, , purple galaxy bottle,"]),
        _node(5, "EmptyLatentImage", [], [_out("LATENT", "LATENT", [2])], [512, 512, 1]),
        _node(3, "KSampler", [_in("model", "MODEL", 1), _in("positive", "CONDITIONING", 4),
                              _in("negative", "CONDITIONING", 6), _in("latent_image", "LATENT", 2)],
              [_out("LATENT", "LATENT", [7])], [156680208700286, "randomize", 20, 8, "euler", "normal", 1]),
        _node(8, "VAEDecode", [_in("samples", "LATENT", 7), _in("vae", "VAE", 8)], [_out("IMAGE", "IMAGE", [9])]),
        _node(9, "SaveImage", [_in("images", "IMAGE", 9)], [], ["ComfyUI"]),
        _node(4, "CheckpointLoaderSimple", [], [_out("MODEL", "MODEL", [1]), _out("CLIP", "CLIP", [3, 5]),
                                                _out("VAE", "VAE", [8])], ["v1-5-pruned-emaonly.safetensors"]),
    ],
    "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
              [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
              [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]],
    "groups": [], "config": {}, "extra": {}, "version": 0.4,
}
POSITIVE = "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,"


def png(texts: dict[str, str] | None = None, itxt: dict[str, str] | None = None, zip_itxt: bool = False) -> bytes:
    info = PngInfo()
    for k, v in (texts or {}).items():
        info.add_text(k, v)
    for k, v in (itxt or {}).items():
        info.add_itxt(k, v, zip=zip_itxt)
    buf = io.BytesIO()
    Image.new("RGB", (80, 64), (30, 120, 200)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def with_exif(fmt: str, comment: bytes) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment  # as piexif.dump({"Exif": {UserComment: ...}}) lays it out
    buf = io.BytesIO()
    Image.new("RGB", (80, 64), (200, 40, 40)).save(buf, fmt, exif=exif.tobytes(), quality=90)
    return buf.getvalue()


def test_a1111_png_parameters_full_infotext():
    data = png({"parameters": A1111})
    assert b"tEXtparameters\0" in data
    info = read_embedded(data)
    assert info.origin == "png:parameters"
    assert info.prompt == (
        "masterpiece, best quality, (cyberpunk city:1.2), neon lights,\n"
        "rainy street, <lora:add_detail:0.7>, art by greg rutkowski"
    )
    assert info.negative_prompt == "lowres, bad anatomy,\n(worst quality:1.4), watermark"
    meta = info.gen_meta
    assert meta["tool"] == "a1111"
    assert (meta["steps"], meta["sampler"], meta["cfg"], meta["seed"]) == (28, "DPM++ 2M Karras", 7.5, 3735928559)
    assert (meta["width"], meta["height"]) == (512, 768)
    assert meta["model"] == "v1-5-pruned-emaonly" and meta["model_hash"] == "6ce0161689"
    raw = meta["source_meta"]  # every pair as written, unquoted
    assert raw["Lora hashes"] == "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef"  # quoted, with commas
    assert (raw["Version"], raw["Size"], raw["CFG scale"]) == ("v1.7.0", "512x768", "7.5")


def test_a1111_unicode_prompt_goes_to_itxt_and_parses():
    text = "café terrace, 夜景, (rain:1.1)\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
    data = png({"parameters": text})
    assert b"iTXtparameters\0" in data  # PngInfo falls back to iTXt for non-Latin-1 text, like A1111 does
    info = read_embedded(data)
    assert info.prompt == "café terrace, 夜景, (rain:1.1)" and info.negative_prompt is None
    zipped = read_embedded(png(itxt={"parameters": text}, zip_itxt=True))
    assert zipped.prompt == info.prompt and zipped.gen_meta == info.gen_meta


def test_infotext_without_parameters_and_weighted_last_line():
    # three `word:weight` groups on the last line must not be taken for a parameters line
    info = parse_infotext("portrait, (red hair:1.2), (freckles:1.1), (smile:0.9)")
    assert info.prompt == "portrait, (red hair:1.2), (freckles:1.1), (smile:0.9)" and info.gen_meta == {}
    only_negative = parse_infotext("a castle\nNegative prompt: blurry")
    assert (only_negative.prompt, only_negative.negative_prompt) == ("a castle", "blurry")
    no_prompt = parse_infotext("Negative prompt: blurry\nSteps: 20, Sampler: Euler, Seed: 5")
    assert no_prompt.prompt == "" and no_prompt.gen_meta["seed"] == 5
    assert read_embedded(png({"parameters": "Steps: 20, Sampler: Euler, Seed: 5"})) is None
    assert parse_infotext("  \n ") is None


def test_comfyui_prompt_chunk_takes_sampler_texts_and_settings():
    data = png({"prompt": json.dumps(COMFY_API), "workflow": json.dumps(COMFY_WORKFLOW)})
    info = read_embedded(data)
    assert info.origin == "comfyui:prompt"
    assert info.prompt == POSITIVE.strip() and info.negative_prompt == "text, watermark"
    assert info.gen_meta == {"tool": "comfyui", "seed": 156680208700286, "steps": 20, "cfg": 8, "sampler": "euler",
                             "scheduler": "normal", "denoise": 1, "model": "v1-5-pruned-emaonly.safetensors",
                             "width": 512, "height": 512}


def test_comfyui_workflow_only_gives_the_same_answer():
    info = read_embedded(png({"workflow": json.dumps(COMFY_WORKFLOW)}))
    api = read_embedded(png({"prompt": json.dumps(COMFY_API)}))
    assert info.origin == "comfyui:workflow"
    assert (info.prompt, info.negative_prompt, info.gen_meta) == (api.prompt, api.negative_prompt, api.gen_meta)


def test_workflow_follows_reroutes_primitives_and_link_objects():
    wf = copy.deepcopy(COMFY_WORKFLOW)
    # the positive text comes from a PrimitiveNode through a Reroute; the seed from another primitive
    pos = next(n for n in wf["nodes"] if n["id"] == 6)
    pos["inputs"].append(_in("text", "STRING", 11, widget="text"))
    sampler = next(n for n in wf["nodes"] if n["id"] == 3)
    sampler["inputs"].append(_in("seed", "INT", 12, widget="seed"))
    wf["nodes"] += [
        _node(20, "PrimitiveNode", [], [_out("STRING", "STRING", [10])], ["a red fox in the snow"]),
        _node(21, "Reroute", [_in("", "*", 10)], [_out("", "STRING", [11])]),
        _node(22, "PrimitiveNode", [], [_out("INT", "INT", [12])], [42, "fixed"]),
    ]
    wf["links"] += [[10, 20, 0, 21, 0, "STRING"], [11, 21, 0, 6, 1, "STRING"], [12, 22, 0, 3, 4, "INT"]]
    info = metadata.read_embedded(png({"workflow": json.dumps(wf)}))
    assert info.prompt == "a red fox in the snow" and info.gen_meta["seed"] == 42
    # the newer link format: objects with origin_id / target_id
    wf["links"] = [{"id": a, "origin_id": b, "origin_slot": c, "target_id": d, "target_slot": e, "type": f}
                   for a, b, c, d, e, f in wf["links"]]
    assert comfyui.parse_workflow(wf)[0] == "a red fox in the snow"


def test_comfyui_lora_chain_and_hires_second_pass():
    g = copy.deepcopy(COMFY_API)
    g["10"] = {"class_type": "LoraLoader", "inputs": {"lora_name": "add_detail.safetensors", "strength_model": 0.7,
                                                      "strength_clip": 0.7, "model": ["4", 0], "clip": ["4", 1]}}
    g["3"]["inputs"]["model"] = ["10", 0]
    # a hires pass: a second sampler fed by the first one's latent, with other settings and a lower id
    g["1"] = {"class_type": "KSampler", "inputs": {**g["3"]["inputs"], "seed": 7, "steps": 12, "denoise": 0.5,
                                                   "latent_image": ["3", 0]}}
    text, negative, meta = comfyui.parse_api_graph(g)
    assert text == POSITIVE.strip() and negative == "text, watermark"
    assert meta["seed"] == 156680208700286 and meta["steps"] == 20  # the first pass, not the hires pass
    assert meta["model"] == "v1-5-pruned-emaonly.safetensors"
    assert meta["loras"] == [{"name": "add_detail.safetensors", "strength": 0.7}]


def test_comfyui_sdxl_controlnet_and_zeroed_negative():
    g = copy.deepcopy(COMFY_API)
    g["6"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": "a lighthouse at dusk",
                                                             "text_l": "a lighthouse at dusk", "clip": ["4", 1]}}
    g["11"] = {"class_type": "ControlNetApplyAdvanced",
               "inputs": {"positive": ["6", 0], "negative": ["7", 0], "control_net": ["12", 0], "image": ["13", 0],
                          "strength": 0.8}}
    g["3"]["inputs"]["positive"], g["3"]["inputs"]["negative"] = ["11", 0], ["11", 1]
    assert comfyui.parse_api_graph(g)[:2] == ("a lighthouse at dusk", "text, watermark")
    g["7"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}}
    assert comfyui.parse_api_graph(g)[:2] == ("a lighthouse at dusk", None)


def test_comfyui_sampler_custom_advanced_with_guider():
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip_l": "a cat astronaut", "t5xxl": "a cat astronaut",
                                                             "guidance": 3.5, "clip": ["9", 0]}},
        "3": {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["2", 0]}},
        "4": {"class_type": "RandomNoise", "inputs": {"noise_seed": 99}},
        "5": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "6": {"class_type": "BasicScheduler", "inputs": {"scheduler": "simple", "steps": 24, "denoise": 1,
                                                         "model": ["1", 0]}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 1}},
        "8": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["4", 0], "guider": ["3", 0],
                                                                "sampler": ["5", 0], "sigmas": ["6", 0],
                                                                "latent_image": ["7", 0]}},
    }
    text, negative, meta = comfyui.parse_api_graph(g)
    assert (text, negative) == ("a cat astronaut", None)
    assert meta == {"tool": "comfyui", "seed": 99, "sampler": "euler", "scheduler": "simple", "steps": 24,
                    "denoise": 1, "model": "flux1-dev.safetensors", "width": 1024, "height": 768}


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("encoding", ["utf-16-be", "utf-16-le"])
def test_exif_user_comment_unicode_both_endiannesses(fmt, encoding):
    text = A1111.replace("neon lights", "néon lights, 東京")
    info = read_embedded(with_exif(fmt, b"UNICODE\0" + text.encode(encoding)))
    assert info.origin == "exif:UserComment"
    assert info.prompt.startswith("masterpiece, best quality, (cyberpunk city:1.2), néon lights, 東京,\n")
    assert info.negative_prompt == "lowres, bad anatomy,\n(worst quality:1.4), watermark"
    assert info.gen_meta["seed"] == 3735928559


@pytest.mark.parametrize("prefix", [b"ASCII\0\0\0", b"\0" * 8, b""])
def test_exif_user_comment_ascii_and_unprefixed(prefix):
    info = read_embedded(with_exif("JPEG", prefix + A1111.encode()))
    assert info.prompt.endswith("art by greg rutkowski") and info.gen_meta["sampler"] == "DPM++ 2M Karras"


def test_jpeg_comment_segment():
    buf = io.BytesIO()
    prompt = "a lonely lighthouse, stormy sea, dramatic sky"
    Image.new("RGB", (80, 64)).save(buf, "JPEG", comment=prompt.encode())
    info = read_embedded(buf.getvalue())
    assert (info.origin, info.prompt, info.gen_meta) == ("jpeg:comment", prompt, {})


def test_png_without_metadata_and_garbage_give_none():
    assert read_embedded(png()) is None
    assert read_embedded(png({"Software": "GIMP"})) is None
    assert read_embedded(b"") is None
    assert read_embedded(b"\x89PNG\r\n\x1a\n" + b"\xff" * 40) is None
    assert read_embedded(b"\xff\xd8\xff\xe1\x00") is None
    assert read_embedded(png({"prompt": "{not json"})) is None
    assert read_embedded(png({"prompt": json.dumps({"1": {"class_type": "KSampler", "inputs": {}}})})) is None


def test_truncated_png_still_yields_text_before_the_cut():
    data = png({"parameters": A1111})
    cut = data[: data.index(b"IDAT") + 10]
    assert read_embedded(cut).prompt.startswith("masterpiece")


def test_compressed_text_bomb_is_refused():
    bomb = zlib.compress(b"a" * (metadata.MAX_TEXT_BYTES + 10))
    body = b"parameters\0\0" + bomb
    chunk = len(body).to_bytes(4, "big") + b"zTXt" + body + zlib.crc32(b"zTXt" + body).to_bytes(4, "big")
    data = png()
    data = data[:33] + chunk + data[33:]  # after IHDR
    assert metadata.png_chunks(data)[0] == {}


def test_sidecar_json_keys_and_other_fields():
    info = read_sidecar_json(json.dumps({"prompt": "a fox, snow", "negativePrompt": "blurry", "seed": 5, "steps": 20}))
    assert (info.prompt, info.negative_prompt, info.origin) == ("a fox, snow", "blurry", "sidecar:json")
    assert info.gen_meta == {"seed": 5, "steps": 20, "source_meta": {"seed": 5, "steps": 20}}
    info = read_sidecar_json(json.dumps({"prompt": "a fox", "negative_prompt": "ugly", "cfg_scale": "6.5", "x": 1}))
    assert info.negative_prompt == "ugly" and info.gen_meta == {"cfg": 6.5, "source_meta": {"cfg_scale": "6.5", "x": 1}}
    assert read_sidecar_json(json.dumps({"prompt": COMFY_API})).prompt == POSITIVE.strip()
    assert read_sidecar_json("{oops") is None
    assert read_sidecar_json(json.dumps({"caption": "no prompt key"})) is None
    assert read_sidecar_json(json.dumps({"prompt": "   "})) is None


def test_sidecar_txt_plain_and_infotext():
    plain = read_sidecar_txt("a watercolor painting of a heron, (soft light:1.2)\n")
    assert (plain.prompt, plain.negative_prompt, plain.gen_meta) == (
        "a watercolor painting of a heron, (soft light:1.2)", None, {})
    full = read_sidecar_txt(A1111)
    assert full.origin == "sidecar:txt" and full.gen_meta["model"] == "v1-5-pruned-emaonly"
    assert read_sidecar_txt("\n\n") is None


def test_invokeai_and_novelai_chunks():
    invoke = {"positive_prompt": "a koi pond", "negative_prompt": "blurry", "seed": 3, "steps": 30}
    info = read_embedded(png({"invokeai_metadata": json.dumps(invoke)}))
    assert (info.prompt, info.negative_prompt, info.gen_meta["tool"], info.gen_meta["seed"]) == (
        "a koi pond", "blurry", "invokeai", 3)
    comment = {"steps": 28, "scale": 5, "seed": 8, "uc": "lowres", "sampler": "k_euler"}
    texts = {"Software": "NovelAI", "Description": "1girl, cherry blossoms", "Comment": json.dumps(comment)}
    info = read_embedded(png(texts))
    assert (info.prompt, info.negative_prompt, info.gen_meta["tool"]) == ("1girl, cherry blossoms", "lowres", "novelai")
