"""Each generator format, on small files the tests build the way those generators write them."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from surd.rows import Drop
from surd.sources import comfyui
from surd.sources.folder import FolderConfig, explain, explain_text
from surd.sources.infotext import parse_infotext
from surd.sources.metadata import read_embedded, read_image
from surd.sources.readings import NoPrompt

NEG = "lowres, bad hands"
SETTINGS = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x768, Model: sd15"


def png(texts: dict[str, str] | None = None, *, image: Image.Image | None = None) -> bytes:
    info = PngInfo()
    for key, value in (texts or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    (image or Image.new("RGB", (8, 8), (30, 120, 200))).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def with_exif(fmt: str, tags: dict[int, str | bytes], user_comment: bytes | None = None, **kwargs) -> bytes:
    exif = Image.Exif()
    for tag, value in tags.items():
        exif[tag] = value
    if user_comment is not None:
        exif.get_ifd(0x8769)[0x9286] = user_comment
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buf, fmt, exif=exif.tobytes(), **kwargs)
    return buf.getvalue()


def node(kind: str, **inputs) -> dict:
    return {"class_type": kind, "inputs": inputs}


def graph(positive_text, negative_text="lowres, bad hands", **extra) -> dict:
    """A text-to-image API graph; the texts may be literals or links."""
    return {
        "1": node("CheckpointLoaderSimple", ckpt_name="sdxl.safetensors"),
        "2": node("CLIPTextEncode", text=positive_text, clip=["1", 1]),
        "3": node("CLIPTextEncode", text=negative_text, clip=["1", 1]),
        "4": node("EmptyLatentImage", width=832, height=1216, batch_size=1),
        "5": node("KSampler", seed=7, steps=25, cfg=6.5, sampler_name="euler", scheduler="karras", denoise=1.0,
                  model=["1", 0], positive=["2", 0], negative=["3", 0], latent_image=["4", 0]),
        "6": node("VAEDecode", samples=["5", 0], vae=["1", 2]),
        "7": node("SaveImage", filename_prefix="x", images=["6", 0]),
        **extra,
    }


# ---- A1111 infotext ---------------------------------------------------------------------------------------


def test_settings_keys_match_case_insensitively_and_json_values_keep_their_commas():
    text = ("a red fox\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M, CFG Scale: 5.5, Seed: 9, Size: 640x480, "
            'Civitai resources: [{"type":"checkpoint","modelVersionId":1,"modelName":"X, Y"}], Hashes: {"model": "ab"},'
            " Version: v1.10.1")
    info = parse_infotext(text)
    assert (info.prompt, info.negative_prompt) == ("a red fox", "blurry")
    assert (info.gen_meta["cfg"], info.gen_meta["steps"], info.gen_meta["width"]) == (5.5, 30, 640)
    raw = info.gen_meta["source_meta"]
    assert json.loads(raw["Civitai resources"])[0]["modelName"] == "X, Y"
    assert raw["Hashes"] == '{"model": "ab"}' and raw["Version"] == "v1.10.1"


def test_placeholder_infotext_gives_way_to_the_graph():
    placeholder = "unknown\nNegative prompt: unknown\nSteps: 20, Sampler: euler, CFG Scale: 8.0, Seed: 0, " \
                  "Size: 512x512, Version: ComfyUI"
    data = png({"parameters": placeholder, "prompt": json.dumps(graph("a lighthouse at dusk"))})
    info = read_image(data)
    assert (info.origin, info.prompt, info.negative_prompt) == ("comfyui:prompt", "a lighthouse at dusk", NEG)
    alone = read_image(png({"parameters": placeholder}))
    assert isinstance(alone, NoPrompt) and alone.reason == "prompt_not_stored"


def stealth_png(text: str, *, mode: str = "alpha", compressed: bool = True) -> bytes:
    """A1111's stealth-pnginfo: signature, bit length and payload in the pixels' low bits, column by column."""
    payload = gzip.compress(text.encode()) if compressed else text.encode()
    signature = f"stealth_{'png' if mode == 'alpha' else 'rgb'}{'comp' if compressed else 'info'}".encode()
    bits = [int(b) for byte in signature for b in f"{byte:08b}"] + [int(b) for b in f"{len(payload) * 8:032b}"]
    bits += [int(b) for byte in payload for b in f"{byte:08b}"]
    per_pixel = 1 if mode == "alpha" else 3
    height = 16
    width = -(-len(bits) // (height * per_pixel))
    image = Image.new("RGBA", (width, height), (120, 80, 40, 255))  # the reader decodes RGBA images only
    pixels = image.load()
    it = iter(bits)
    for x in range(width):
        for y in range(height):
            value = list(pixels[x, y])
            channels = [3] if mode == "alpha" else [0, 1, 2]
            for c in channels:
                value[c] = (value[c] & 0xFE) | next(it, 0)
            pixels[x, y] = tuple(value)
    return png(image=image)


@pytest.mark.parametrize(("mode", "compressed"), [("alpha", True), ("alpha", False), ("rgb", True)])
def test_a1111_stealth_metadata(mode, compressed):
    info = read_image(stealth_png(f"a koi pond\nNegative prompt: {NEG}\n{SETTINGS}", mode=mode, compressed=compressed))
    assert (info.origin, info.prompt, info.negative_prompt, info.gen_meta["seed"]) == ("png:stealth", "a koi pond",
                                                                                      NEG, 42)


def test_plain_pixels_are_not_stealth_metadata():
    assert read_image(png(image=Image.new("RGBA", (64, 64), (1, 2, 3, 255)))) is None
    assert read_image(png(image=Image.new("RGB", (64, 64), (1, 2, 3)))) is None


# ---- ComfyUI ---------------------------------------------------------------------------------------------------


def test_text_through_reroutes_primitives_switches_and_concatenation():
    g = graph(["10", 0])
    g.update({
        "10": node("Reroute", input=["11", 0]),
        "11": node("ComfySwitchNode", switch=["12", 0], on_true=["13", 0], on_false=["14", 0]),
        "12": node("PrimitiveBoolean", value=True),
        "13": node("StringConcatenate", string_a=["15", 0], string_b="golden hour", delimiter=", "),
        "14": node("PrimitiveStringMultiline", value="the branch not taken"),
        "15": node("DF_Text_Box", Text="a castle on a cliff"),
    })
    assert comfyui.parse_api_graph(g)[0] == "a castle on a cliff, golden hour"
    g["12"]["inputs"]["value"] = False
    assert comfyui.parse_api_graph(g)[0] == "the branch not taken"


def test_prompt_encoders_with_other_input_names():
    g = graph("unused")
    g["2"] = node("Power Prompt (rgthree)", prompt="a misty forest", insert_lora="CHOOSE", opt_clip=["1", 1])
    assert comfyui.parse_api_graph(g)[:2] == ("a misty forest", NEG)
    g["2"] = node("CLIPTextEncode", TEXT="upper case input name", clip=["1", 1])
    assert comfyui.parse_api_graph(g)[0] == "upper case input name"


def test_text_made_at_run_time_is_not_stored():
    g = graph(["20", 0])
    g.update({"20": node("TextGenerate", prompt=["21", 0], clip=["1", 1], max_length=256),
              "21": node("PrimitiveStringMultiline", value="Expand this into a detailed prompt: a cat")})
    found = comfyui.read_api_graph(g)
    assert isinstance(found, NoPrompt) and found.reason == "prompt_not_stored" and "TextGenerate" in found.detail
    assert found.gen_meta["seed"] == 7  # the settings are still known
    assert read_embedded(png({"prompt": json.dumps(g)})) is None


def test_the_saved_image_decides_the_sampler():
    g = graph("a snowy village")
    # a second pass on the upscaled first image, with its own prompt, is what the save node gets
    g.update({
        "20": node("CLIPTextEncode", text="a snowy village, detailed, sharp", clip=["1", 1]),
        "21": node("LatentUpscaleBy", upscale_method="nearest-exact", scale_by=1.5, samples=["5", 0]),
        "22": node("KSampler", seed=99, steps=10, cfg=5.0, sampler_name="dpmpp_2m", scheduler="karras", denoise=0.4,
                   model=["1", 0], positive=["20", 0], negative=["3", 0], latent_image=["21", 0]),
        "23": node("VAEDecode", samples=["22", 0], vae=["1", 2]),
    })
    g["7"]["inputs"]["images"] = ["23", 0]
    g["8"] = node("PreviewImage", images=["6", 0])  # a preview of the first pass
    prompt, negative, meta = comfyui.parse_api_graph(g)
    assert (prompt, negative) == ("a snowy village, detailed, sharp", NEG)
    assert (meta["seed"], meta["steps"], meta["denoise"], meta["width"], meta["height"]) == (7, 25, 1.0, 832, 1216)


def subgraph_workflow() -> dict:
    """A UI workflow whose prompt and sampler live in a subgraph; the prompt is a promoted widget of the instance."""
    inner_links = [
        {"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 3, "target_slot": 1, "type": "STRING"},
        {"id": 2, "origin_id": 1, "origin_slot": 1, "target_id": 3, "target_slot": 0, "type": "CLIP"},
        {"id": 3, "origin_id": 3, "origin_slot": 0, "target_id": 5, "target_slot": 1, "type": "CONDITIONING"},
        {"id": 4, "origin_id": 4, "origin_slot": 0, "target_id": 5, "target_slot": 2, "type": "CONDITIONING"},
        {"id": 5, "origin_id": 1, "origin_slot": 0, "target_id": 5, "target_slot": 0, "type": "MODEL"},
        {"id": 6, "origin_id": 2, "origin_slot": 0, "target_id": 5, "target_slot": 3, "type": "LATENT"},
        {"id": 7, "origin_id": 5, "origin_slot": 0, "target_id": 6, "target_slot": 0, "type": "LATENT"},
        {"id": 8, "origin_id": 6, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "IMAGE"},
        {"id": 9, "origin_id": 1, "origin_slot": 2, "target_id": 6, "target_slot": 1, "type": "VAE"},
    ]

    def ui(nid, kind, widgets, inputs=()):
        return {"id": nid, "type": kind, "mode": 0, "widgets_values": widgets,
                "inputs": [{"name": n, "link": link, **({"widget": {"name": n}} if w else {})}
                           for n, link, w in inputs]}

    inner = [
        ui(1, "CheckpointLoaderSimple", ["flux.safetensors"]),
        ui(2, "EmptyLatentImage", [1024, 640, 1]),
        ui(3, "CLIPTextEncode", ["a stale widget text"], [("clip", 2, False), ("text", 1, True)]),
        ui(4, "CLIPTextEncode", ["blurry"], [("clip", None, False)]),
        ui(5, "KSampler", [1234, "fixed", 30, 4.5, "euler", "simple", 1],
           [("model", 5, False), ("positive", 3, False), ("negative", 4, False), ("latent_image", 6, False)]),
        ui(6, "VAEDecode", [], [("samples", 7, False), ("vae", 9, False)]),
    ]
    sub_id = "5d1c0f6e-0000-4000-8000-000000000001"
    return {
        "nodes": [ui(10, sub_id, ["a lantern-lit harbour at night"], [("prompt", None, True)]),
                  ui(11, "SaveImage", ["x"], [("images", 20, False)])],
        "links": [[20, 10, 0, 11, 0, "IMAGE"]],
        "definitions": {"subgraphs": [{"id": sub_id, "name": "Text to image", "nodes": inner, "links": inner_links,
                                       "inputs": [{"name": "prompt", "type": "STRING", "linkIds": [1]}],
                                       "outputs": [{"name": "IMAGE", "type": "IMAGE", "linkIds": [8]}]}]},
        "version": 0.4,
    }


def test_workflow_subgraphs_are_expanded():
    wf = subgraph_workflow()
    flat = comfyui.workflow_to_graph(wf)
    # the text is the instance's promoted widget, not the inner node's stale one
    assert flat["10:3"]["inputs"]["text"] == "a lantern-lit harbour at night"
    info = read_image(png({"workflow": json.dumps(wf)}))
    assert (info.origin, info.prompt, info.negative_prompt) == ("comfyui:workflow", "a lantern-lit harbour at night",
                                                                 "blurry")
    assert (info.gen_meta["seed"], info.gen_meta["steps"], info.gen_meta["width"]) == (1234, 30, 1024)


def test_workflow_is_not_read_when_the_api_graph_says_the_text_is_not_stored():
    g = graph(["20", 0])
    g["20"] = node("OllamaGenerate", prompt="describe a cat", model="llama3")
    wf = subgraph_workflow()  # a workflow whose widgets would give some text
    found = read_image(png({"prompt": json.dumps(g), "workflow": json.dumps(wf)}))
    assert isinstance(found, NoPrompt) and found.reason == "prompt_not_stored"


# ---- JSON documents: parsed by layout, never a prompt -----------------------------------------------------------


SWARM = {"sui_image_params": {"prompt": "a glass bottle, galaxy inside", "negativeprompt": "blurry", "model": "sdxl",
                              "seed": 5, "steps": 28, "cfgscale": 6.0, "width": 1024, "height": 1024,
                              "sampler": "euler", "scheduler": "karras", "swarm_version": "0.9.7"},
         "sui_models": [{"name": "sdxl.safetensors", "param": "model"}]}


@pytest.mark.parametrize("where", ["png", "jpeg", "webp"])
def test_swarmui_document(where):
    text = json.dumps(SWARM, indent=1)
    data = png({"parameters": text}) if where == "png" else with_exif(where.upper(), {},
                                                                       b"UNICODE\0" + text.encode("utf-16-be"))
    info = read_image(data)
    assert (info.prompt, info.negative_prompt, info.reader) == ("a glass bottle, galaxy inside", "blurry", "swarmui")
    assert (info.gen_meta["tool"], info.gen_meta["cfg"], info.gen_meta["seed"]) == ("swarmui", 6.0, 5)


def test_fooocus_and_ruinedfooocus_documents():
    fooocus = {"prompt": "a fox", "negative_prompt": "",
               "full_prompt": ["cinematic still a fox . moody", "a fox, sharp"],
               "full_negative_prompt": ["lowres", "anime"], "base_model": "juggernautXL", "guidance_scale": 4,
               "resolution": "(896, 1152)", "seed": "123", "steps": 30, "sampler": "dpmpp_2m_sde_gpu",
               "metadata_scheme": "fooocus", "version": "Fooocus v2.5.0"}
    info = read_image(png({"parameters": json.dumps(fooocus), "fooocus_scheme": "fooocus"}))
    assert (info.prompt, info.negative_prompt) == ("cinematic still a fox . moody\na fox, sharp", "lowres\nanime")
    assert (info.gen_meta["model"], info.gen_meta["width"], info.gen_meta["seed"]) == ("juggernautXL", 896, 123)
    ruined = {"Prompt": "a hare", "Negative": "ugly", "steps": 30, "cfg": 8, "seed": 1, "software": "RuinedFooocus",
              "base_model_name": "sdxl.safetensors"}
    info = read_image(png({"parameters": json.dumps(ruined)}))
    assert (info.prompt, info.negative_prompt, info.gen_meta["model"]) == ("a hare", "ugly", "sdxl.safetensors")


def test_unknown_json_is_dropped_naming_the_generator():
    doc = {"software": "DreamForge 3", "positive": 12, "settings": {"a": 1}}
    found = read_image(png({"parameters": json.dumps(doc)}))
    assert isinstance(found, NoPrompt) and found.reason == "unknown_metadata_format"
    assert "DreamForge 3" in found.detail
    assert read_embedded(png({"parameters": json.dumps(doc)})) is None
    # a prompt that only looks like JSON (dynamic-prompt braces) is still a prompt
    assert read_image(png({"parameters": f"{{red|blue}} car, {{day|night}}\n{SETTINGS}"})).prompt == \
        "{red|blue} car, {day|night}"


def test_novelai_webp_and_character_prompts():
    comment = {"prompt": "2girls, park", "uc": "lowres", "steps": 28, "scale": 5.0, "seed": 3, "width": 832,
               "height": 1216, "sampler": "k_euler_ancestral",
               "v4_prompt": {"caption": {"base_caption": "2girls, park", "char_captions": [
                   {"char_caption": "girl, red hair, ", "centers": []},
                   {"char_caption": "girl, blue hair", "centers": []}]}},
               "v4_negative_prompt": {"caption": {"base_caption": "lowres", "char_captions": [
                   {"char_caption": "", "centers": []}]}}}
    wrapped = {"Comment": json.dumps(comment), "Description": "\0\0\0\x002girls, park", "Software": "NovelAI",
               "Source": "NovelAI Diffusion V4.5 4BDE2A90", "Title": "NovelAI generated image"}
    info = read_image(with_exif("WEBP", {}, b"ASCII\0\0\0" + json.dumps(wrapped).encode(), lossless=True))
    assert (info.prompt, info.negative_prompt) == ("2girls, park\ngirl, red hair,\ngirl, blue hair", "lowres")
    assert (info.gen_meta["tool"], info.gen_meta["model"], info.gen_meta["cfg"]) == (
        "novelai", "NovelAI Diffusion V4.5 4BDE2A90", 5.0)


def test_comfyui_graphs_in_exif():
    g = graph("a red barn in a wheat field")
    plus = json.dumps({"prompt": g, "workflow": {"nodes": [], "links": []}})
    info = read_image(with_exif("JPEG", {}, b"UNICODE\0" + plus.encode("utf-16-be")))
    assert (info.origin, info.prompt, info.gen_meta["tool"]) == ("exif:UserComment", "a red barn in a wheat field",
                                                                 "comfyui")
    extended = with_exif("JPEG", {0x010E: "Workflow: " + json.dumps({"nodes": []}), 0x010F: "Prompt: " + json.dumps(g)})
    assert read_image(extended).origin == "exif:Make"
    animated = with_exif("WEBP", {0x0110: "prompt:" + json.dumps(g), 0x010F: "workflow:{}"}, lossless=True)
    assert (read_image(animated).origin, read_image(animated).prompt) == ("exif:Model", "a red barn in a wheat field")


def test_civitai_upscale_graph_keeps_the_generation_prompt_aside():
    doc = {"1": node("LoadImage", image="https://example.org/x.jpeg"),
           "2": node("UpscaleModelLoader", model_name="urn:air:other:upscaler:civitai:1@2"),
           "3": node("ImageUpscaleWithModel", upscale_model=["2", 0], image=["1", 0]),
           "4": node("SaveImage", filename_prefix="ComfyUI", images=["3", 0]),
           "extra": {"airs": []},
           "extraMetadata": json.dumps({"prompt": "a lighthouse", "negativePrompt": "blurry", "steps": 25,
                                        "cfgScale": 5, "sampler": "Euler a", "seed": 11})}
    info = read_image(with_exif("JPEG", {}, b"UNICODE\0" + json.dumps(doc).encode("utf-16-le")))
    assert (info.prompt, info.negative_prompt, info.gen_meta["tool"], info.gen_meta["seed"]) == (
        "a lighthouse", "blurry", "civitai", 11)


def test_invokeai_dream_sd_metadata_and_tensorart():
    dream = '"a koi pond [blurry, murky] at dawn" -s 40 -S 77 -W 640 -H 448 -C 7.5 -A k_euler'
    info = read_image(png({"Dream": dream}))
    assert (info.prompt, info.negative_prompt) == ("a koi pond at dawn", "blurry, murky")
    assert (info.gen_meta["steps"], info.gen_meta["seed"], info.gen_meta["cfg"], info.gen_meta["width"]) == (
        40, 77, 7.5, 640)
    sd_meta = {"model_weights": "sd-1.5", "app_id": "invoke-ai/InvokeAI", "app_version": "2.3.0",
               "image": {"prompt": [{"prompt": "a koi pond [blurry]", "weight": 1.0}], "steps": 40, "seed": 77,
                         "cfg_scale": 7.5, "sampler": "k_euler", "width": 640, "height": 448}}
    info = read_image(png({"sd-metadata": json.dumps(sd_meta), "Dream": dream}))
    assert (info.origin, info.prompt, info.negative_prompt, info.gen_meta["model"]) == (
        "png:sd-metadata", "a koi pond", "blurry", "sd-1.5")
    tensorart = {"prompt": "a paper boat", "negativePrompt": "lowres", "width": 768, "height": 768, "steps": 20,
                 "cfgScale": 6, "seed": "-1", "ksamplerName": "euler", "baseModel": {"modelFileName": "Illustrious"}}
    info = read_image(png({"generation_data": json.dumps(tensorart) + "\0"}))
    assert (info.prompt, info.negative_prompt, info.gen_meta["model"], info.gen_meta["tool"]) == (
        "a paper boat", "lowres", "Illustrious", "tensorart")


# ---- comments, sidecars, explain --------------------------------------------------------------------------------


def jpeg_with_comment(text: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG", comment=text.encode())
    return buf.getvalue()


def test_bare_comments_need_the_option_or_a_sidecar(tmp_path):
    (tmp_path / "note.jpg").write_bytes(jpeg_with_comment("re-saved in GIMP"))
    (tmp_path / "prompt.jpg").write_bytes(jpeg_with_comment("a koi pond, ukiyo-e"))
    (tmp_path / "explicit.jpg").write_bytes(jpeg_with_comment("re-saved in GIMP"))
    (tmp_path / "explicit.txt").write_text("a koi pond, ukiyo-e")
    (tmp_path / "infotext.jpg").write_bytes(jpeg_with_comment(f"a koi pond\n{SETTINGS}"))

    def rows(**options):
        source = FolderConfig(path=tmp_path, **options).build()
        return {(i.row if isinstance(i, Drop) else i)["source_id"]: i for p in source.list_partitions()
                for i in source.read_partition(p)}

    default = rows()
    assert default["note.jpg"].reason == default["prompt.jpg"].reason == "no_prompt"
    assert default["explicit.jpg"]["keyword_prompt_raw"] == "a koi pond, ukiyo-e"
    assert default["infotext.jpg"]["keyword_prompt_raw"] == "a koi pond"  # settings make a comment metadata
    opted = rows(bare_comments=True)
    assert opted["prompt.jpg"]["keyword_prompt_raw"] == "a koi pond, ukiyo-e"
    assert json.loads(opted["prompt.jpg"]["gen_meta"])["meta_source"] == "jpeg:comment"


def test_sidecar_json_in_any_layout(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "a.json").write_text(json.dumps(SWARM))
    (tmp_path / "b.png").write_bytes(png())
    (tmp_path / "b.json").write_text(json.dumps({"software": "X", "caption": "a cat"}))
    source = FolderConfig(path=tmp_path).build()
    a, b = source.read_partition(["a.png", "b.png"])
    assert a["keyword_prompt_raw"] == "a glass bottle, galaxy inside" and a["negative_prompt"] == "blurry"
    assert isinstance(b, Drop) and b.reason == "unknown_metadata_format" and "b.json" in b.detail


def test_dropped_rows_keep_the_settings_that_were_found(tmp_path):
    g = graph(["20", 0])
    g["20"] = node("TextGenerate", prompt="write a prompt", clip=["1", 1])
    (tmp_path / "x.png").write_bytes(png({"prompt": json.dumps(g)}))
    (drop,) = FolderConfig(path=tmp_path).build().read_partition(["x.png"])
    assert drop.reason == "prompt_not_stored" and "x.png" in drop.detail
    assert json.loads(drop.row["gen_meta"])["seed"] == 7 and drop.row["image"]["bytes"]


def test_explain_lists_every_reading(tmp_path):
    placeholder = "unknown\nNegative prompt: unknown\nSteps: 20, Seed: 0, Size: 512x512, Version: ComfyUI"
    (tmp_path / "saver.png").write_bytes(png({"parameters": placeholder,
                                              "prompt": json.dumps(graph("a tram in the rain"))}))
    (tmp_path / "note.jpg").write_bytes(jpeg_with_comment("re-saved in GIMP"))
    (tmp_path / "note.json").write_text('{"prompt": ' + "[" * 500 + "]" * 500 + "}")
    saver, note = explain([tmp_path / "saver.png", tmp_path / "note.jpg"])
    assert [(r["origin"], r.get("reason")) for r in saver["readings"]] == [
        ("png:parameters", "prompt_not_stored"), ("comfyui:prompt", None)]
    assert (saver["row"], saver["prompt"], saver["negative_prompt"], saver["gen_meta"]["steps"]) == (
        "kept", "a tram in the rain", NEG, 25)
    assert [r["reason"] for r in note["readings"]] == ["no_prompt", "json_too_deep"]
    assert (note["row"], note["reason"]) == ("dropped", "no_prompt")
    text = explain_text([saver, note])
    assert "saver.png: kept from comfyui:prompt [comfyui]" in text and "note.jpg: dropped (no_prompt)" in text
    assert explain([tmp_path / "note.jpg"], bare_comments=True)[0]["prompt"] == "re-saved in GIMP"



def test_explain_command_names_the_reader_and_the_row(tmp_path):
    from typer.testing import CliRunner

    from surd.cli import app

    infotext = "a red fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5"
    (tmp_path / "a.png").write_bytes(png({"parameters": infotext}))
    (tmp_path / "note.jpg").write_bytes(jpeg_with_comment("re-saved in GIMP"))
    result = CliRunner().invoke(app, ["explain", str(tmp_path / "a.png"), str(tmp_path / "note.jpg"), "--json"])
    assert result.exit_code == 0, result.output
    entries = {Path(e["file"]).name: e for e in json.loads(result.output)}
    assert entries["a.png"]["row"] == "kept" and entries["a.png"]["prompt"] == "a red fox"
    assert entries["note.jpg"]["row"] == "dropped"
    opted_in = CliRunner().invoke(app, ["explain", str(tmp_path / "note.jpg"), "--bare-comments", "--json"])
    assert json.loads(opted_in.output)[0]["row"] == "kept"
    missing = CliRunner().invoke(app, ["explain", str(tmp_path / "nope.png")])
    assert missing.exit_code != 0 and "not a file" in str(missing.exception or missing.output)
