"""The 93 real generated images of ../shared/peer-metadata (from sd-parsers' and sd-metadata's test suites).

Every expectation below was written down from the metadata bytes of each file as its format's documentation
reads them (A1111 infotext: prompt lines stripped, `Negative prompt:` lines, the settings line; ComfyUI: the
text reaching the sampler; JSON layouts: their own prompt keys), not from this code's output. The folder is
read in place (it is not part of the repository); the tests skip when it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surd.rows import Drop
from surd.sources.folder import FolderConfig, explain
from surd.sources.metadata import read_image
from surd.sources.readings import NoPrompt, PromptInfo

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared" / "peer-metadata" / "images").resolve()
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="the shared peer-metadata folder is not here")


class Prefix(str):
    """An expected text given by its beginning (for the long negative prompts)."""


# A1111-family infotexts (lines stripped, as A1111 reads them back)
HEAD = "general, masterpiece, best quality, amazing quality,\n1girl, solo, hatsune miku,"
TEST, HASH_TEST = HEAD + " テスト", HEAD + " #テスト"
NEG = "bad quality, worst quality, worst detail, sketch, censor,"
# the same texts as ComfyUI graphs and JSON documents hold them (only the ends stripped)
RAW_HEAD = "general, masterpiece, best quality, amazing quality, \n1girl, solo, hatsune miku,"
RAW_HASH_TEST = RAW_HEAD + " #テスト"
DUCK = ("photo of a duck", "monochrome", 235284042)
NAI_NEG = Prefix("nsfw, lowres, artistic error, film grain, scan artifacts, worst quality, bad quality")
CURATED = "1girl, solo, hatsune miku, #テスト, very aesthetic, masterpiece, no text, -0.8::feet::, rating:general"
CURATED_NEG = ("blurry, lowres, upscaled, artistic error, scan artifacts, jpeg artifacts, logo, too many watermarks, "
               "negative space, blank page")
THREE_CHARS = ("2girls, 1boy, dancing, #テスト\nwhite background, , very aesthetic, masterpiece, no text\n"
               "girl, hatsune miku, spread arms,\ngirl, kagamine rin, hand up,\nboy, kagamine len, hand up,")
INVOKE2 = ("professional full body photo of young woman, hyper long brunette hair, elegant hair, wearing a bikini "
           "top and asymmetric short skirt, curvy body, long legs, (imperfect skin), detailed skin, intense freckles, "
           "super long eye lashes, at night, outside, city background, 8k ultra detailed, realistic, high quality, "
           "film grain, low contrast")
COMFY_NEG = Prefix("(hands), text, error, cropped, (worst quality:1.2), (low quality:1.2), normal quality")

# file -> (prompt, negative prompt, seed), or the drop reason, or None: no generation metadata at all
EXPECTED: dict[str, tuple[str, str | None, int] | str | None] = {
    # --- A1111, Forge, reForge, SD.Next, Stability Matrix, Civitai, ComfyUI save nodes: infotexts
    "enslo__jpg__civitai.jpeg": (HASH_TEST, NEG, 1311178179),
    "enslo__jpg__comfyui-saveimagewithmetadata.jpeg": (HEAD, NEG, 347382230306562),
    "enslo__jpg__forge-classic-hires.jpeg": (TEST, NEG, 3452054396),
    "enslo__jpg__forge-classic.jpeg": (TEST, NEG, 2547514258),
    "enslo__jpg__forge-neo.jpeg": (HEAD, NEG, 2417156106),
    "enslo__jpg__reforge-hires.jpeg": (TEST, NEG, 3494396176),
    "enslo__jpg__reforge.jpeg": (TEST, NEG, 584157617),
    "enslo__jpg__sd-next-hires.jpg": (HASH_TEST, NEG, 3970581939),
    "enslo__jpg__sd-next.jpg": (HASH_TEST, NEG, 899700607),
    "enslo__jpg__sd-webui.jpg": (TEST, NEG, 3623174757),
    "enslo__png__comfyui-saveimagewithmetadata.png": (HEAD, NEG, 38802053347333),
    "enslo__png__easy-reforge.png": (
        "1girl, solo, hatsune miku, テスト,\n<lora:NoobV065sHyperDmd:1> masterpiece, best quality, very aesthetic, "
        "absurdres, newest, safe", "bad anatomy, worst quality, low quality", 2582194946),
    "enslo__png__forge-classic-adetailer.png": (
        "general, masterpiece, best quality, amazing quality,\n1girl, solo, hatsune miku, cowboy shot, dutch angle, "
        "テスト", NEG, 4179307297),
    "enslo__png__forge-classic-hires.png": (TEST, NEG, 2301589892),
    "enslo__png__forge-classic.png": (TEST, NEG, 1239240392),
    "enslo__png__forge-neo-adetailer.png": (TEST, NEG, 4179307297),
    "enslo__png__forge-neo-hires.png": (HEAD, NEG, 449383496),
    "enslo__png__forge-neo.png": (TEST, NEG, 4179307297),
    "enslo__png__forge.png": (TEST, NEG, 747066619),
    "enslo__png__reforge-hires.png": (TEST, NEG, 879759072),
    "enslo__png__reforge.png": (TEST, NEG, 270740395),
    "enslo__png__sd-next-hires.png": (HASH_TEST, NEG, 1968293115),
    "enslo__png__sd-next.png": (HASH_TEST, NEG, 2427651458),
    "enslo__png__sd-webui-hires.png": (TEST, NEG, 3888671826),
    "enslo__png__sd-webui.png": (TEST, NEG, 3782896554),
    "enslo__png__stability-matrix-hires.png": (HASH_TEST, NEG, 2073041550),
    "enslo__png__stability-matrix-upscale.png": (HASH_TEST, NEG, 963022979),
    "enslo__png__stability-matrix.png": (HASH_TEST, NEG, 395309383),
    "enslo__webp__comfyui-saveimagewithmetadata.webp": (HEAD, NEG, 827555711811618),
    "enslo__webp__forge-classic-hires.webp": (TEST, NEG, 2991931972),
    "enslo__webp__forge-classic.webp": (TEST, NEG, 2630661657),
    "enslo__webp__forge-neo.webp": (HEAD, NEG, 2056443400),
    "enslo__webp__reforge-hires.webp": (TEST, NEG, 1010990389),
    "enslo__webp__sd-next-hires.webp": (HASH_TEST, NEG, 1755251313),
    "enslo__webp__sd-next.webp": (HASH_TEST, NEG, 3014033436),
    "enslo__webp__sd-webui.webp": (TEST, NEG, 1028435836),
    "sdparsers__AUTOMATIC1111__automatic1111_cropped.jpg": DUCK,
    "sdparsers__AUTOMATIC1111__automatic1111_cropped.png": DUCK,
    "sdparsers__bad_images__text_after_idat.png": DUCK,  # a zTXt chunk after IDAT is still read
    # the infotext hidden in the alpha channel's low bits
    "sdparsers__AUTOMATIC1111__automatic1111_stealth.png": ("a circle", "a square", 2015833630),
    # --- ComfyUI graphs: the text reaching the sampler of the saved image; the seed of the first pass
    "enslo__png__comfyui.png": (RAW_HEAD + " テスト,", NEG, 422847914351919),
    "enslo__png__comfyui-group-nodes.png": (RAW_HEAD + " テスト,", NEG, 1038684211150939),
    "enslo__png__comfyui-hires.png": (RAW_HEAD, NEG, 1116526567339338),
    "enslo__png__comfyui-upscale.png": (RAW_HEAD, NEG, 511796159331902),
    "enslo__png__comfyui-save-image-extended.png": (RAW_HEAD, NEG, 779742380066441),
    "enslo__png__comfyui-saveimage-plus.png": (RAW_HEAD, NEG, 434067965194649),
    "enslo__png__comfyui-low-denoise.png": (
        "general, masterpiece, best quality, amazing quality, 4k, very aesthetic, ultra-detailed, (pixel art, "
        "dithering, pixelated, sprite art, 8-bit:1.2), \n1girl, solo, hatsune miku, cowboy shot, #テスト",
        Prefix("modern, recent, old, oldest, anime, illustration,"), 667022537790957),
    # rgthree Power Prompt: the encoder's text input is called `prompt`
    "enslo__png__comfyui-rgthree.png": (RAW_HEAD + " テスト,", NEG, 963381484256655),
    # comfyroll: the text comes from a `DF_Text_Box` whose input is `Text`; the seed from a `CR Seed` node
    "enslo__png__comfyui-comfyroll.png": (RAW_HASH_TEST, NEG, 942975376742792),
    "enslo__png__comfyui-anima.png": (
        RAW_HEAD + " holding sign, cowboy shot, looking at viewer, smile.\nA Beautiful and high quality anime "
        "illustrations.\nShe's holding a rectangular sign out in front of her that reads \"初音ミク\".",
        NEG, 662066908990052),
    # a placeholder infotext ("unknown", Version: ComfyUI) beside a complete graph: the graph wins
    "enslo__png__comfyui-comfy-image-saver.png": (RAW_HEAD, NEG, 106744160813738),
    # ...and alone, it is no prompt at all
    "enslo__jpg__comfyui-comfy-image-saver.jpeg": "prompt_not_stored",
    "enslo__webp__comfyui-comfy-image-saver.webp": "prompt_not_stored",
    # the graph's text comes out of an LLM node (TextGenerate) at run time
    "enslo__png__krea2.png": "prompt_not_stored",
    # graphs in EXIF: SaveImagePlus (UserComment), save-image-extended and ComfyUI's WebP writer (Make / Model)
    "enslo__jpg__comfyui-saveimage-plus.jpg": (RAW_HEAD, NEG, 577723948579568),
    "enslo__webp__comfyui-saveimage-plus.webp": (RAW_HEAD, NEG, 453851843419278),
    "enslo__jpg__comfyui-save-image-extended.jpeg": (RAW_HEAD, NEG, 813617545434765),
    "enslo__webp__comfyui-save-image-extended.webp": (RAW_HEAD, NEG, 602057552457611),
    "enslo__webp__comfyui-animated-webp.webp": (RAW_HEAD + " テスト,", NEG, 270932924124066),
    # Civitai's generator: a graph plus `extraMetadata`; the upscale-only graph has no sampler at all
    "enslo__jpg__civitai-hires.jpg": (RAW_HASH_TEST, NEG, 1311178179),
    "enslo__jpg__civitai-upscale.jpg": (RAW_HASH_TEST, NEG, 1311178179),
    # TensorArt: the graph that ran (its negative has no trailing comma), with `generation_data` beside it
    "enslo__png__tensorart.png": (RAW_HASH_TEST, "bad quality, worst quality, worst detail, sketch, censor",
                                  3036459311),
    "sdparsers__ComfyUI__img2img_cropped.png": (
        "photograph of victorian woman with wings, sky clouds, meadow grass", "watermark, text", 280823642470253),
    # two save nodes: the second pass's image; its prompt, and the seed of the pass that started from noise
    "sdparsers__ComfyUI__night_evening_day_morning_cropped.png": (
        "(best quality) beautiful (HDR:1.2) (realistic:1.2) landscape breathtaking amazing view nature scenery "
        "photograph forest mountains ocean daytime night evening morning, (sky:1.2)", COMFY_NEG, 335608130539327),
    "sdparsers__ComfyUI__noisy_latents_3_subjects_cropped.png": (
        "girl (flat chest:0.9), (fennec ears:1.0)\u00a0 (fox ears:1.0), (messy hair), (highlights), (realistic starry "
        "eyes pupil:1.1), (hoodie), open jacket, running (school uniform)\nsky clouds nature national park beautiful "
        "winter snow scenery HDR landscape\n(sunset)", COMFY_NEG, 512136241112371),
    "sdparsers__ComfyUI__unclip_2pass_cropped.png": (
        "beautiful scenery landscape outdoors mountains", Prefix("(hands), text, error, cropped, (jpeg artifacts:1.3)"),
        1106257833005336),
    # --- JSON documents, read by layout
    "enslo__png__swarmui.png": (RAW_HASH_TEST, NEG, 2083100758),
    "enslo__png__swarmui-hires.png": (RAW_HASH_TEST, NEG, 733776228),
    "enslo__png__swarmui-upscale.png": (RAW_HASH_TEST, NEG, 1741309074),
    "enslo__jpg__swarmui.jpg": (RAW_HASH_TEST, NEG, 697543491),
    "enslo__webp__swarmui.webp": (RAW_HASH_TEST, NEG, 830680752),
    "enslo__png__huggingface-space.png": (RAW_HEAD + " テスト", NEG, 443800072),
    "enslo__png__huggingface-space-upscale.png": (RAW_HEAD + " テスト", NEG, 1971450810),
    "enslo__png__ruined-fooocus.png": (RAW_HASH_TEST, NEG, 2020047614),
    # Fooocus encodes its styled prompt and its expansion: `full_prompt`, one line each
    "sdparsers__Fooocus__fooocus1_cropped.png": (
        "cinematic still a smiling goldfish . emotional, harmonious, vignette, 4k epic detailed, shot on kodak, 35mm "
        "photo, sharp focus, high budget, cinemascope, moody, epic, gorgeous, film grain, grainy\na smiling goldfish, "
        "deep focus, intricate, elegant, highly detailed, cinematic, still, dynamic background, professional fine "
        "composition, ambient light, magic, vivid colors, creative, positive, attractive, glossy, shiny, colorful, "
        "strong, sharp, heroic, awesome, determined, cute, epic, stunning, gorgeous, amazing, symmetry, great, "
        "perfect, excellent, complex",
        Prefix("(worst quality, low quality, normal quality, lowres, low details, oversaturated,"),
        6952411511246973023),
    "enslo__png__invokeai.png": (RAW_HASH_TEST, NEG, 3951921344),
    "sdparsers__InvokeAI__invokeai_imeta1.png": (
        "digital artwork, oil painting. painterly brushstrokes, holidays,",
        "grainy+, photo, oversaturated, overexposed, blurry, compressed jpg+, noisy++, unfocused , black and white",
        3293022630),
    # InvokeAI 2: `[bracketed]` words are the negative prompt
    "sdparsers__InvokeAI__invokeai_dream1.png": (INVOKE2, "rendering, glowing eyes, skinny", 2980747362),
    "sdparsers__InvokeAI__invokeai_sdmeta1.png": (INVOKE2, "rendering, glowing eyes, skinny", 2980747362),
    "sdparsers__NovelAI__novelai1_cropped.png": (
        "masterpiece, best quality,  cat, space, icon", Prefix("lowres, bad anatomy, bad hands, text, error,"),
        2253955223),
    "enslo__png__novelai-curated.png": (CURATED, CURATED_NEG, 2156638429),
    "enslo__png__novelai-full.png": (
        "1girl, solo, hatsune miku, #テスト, very aesthetic, masterpiece, no text", NAI_NEG, 2043807047),
    "enslo__png__novelai-full-3char.png": (THREE_CHARS, NAI_NEG, 1702945580),
    "enslo__webp__novelai-curated.webp": (CURATED, CURATED_NEG, 880673757),
    "enslo__webp__novelai-full-3char.webp": (THREE_CHARS, NAI_NEG, 447042893),
    # --- an editor's note is not a prompt; files without generation metadata
    "enslo__jpg__gimp.jpg": "no_prompt",
    "enslo__png__gimp.png": "no_prompt",
    "enslo__webp__gimp.webp": "no_prompt",
    "enslo__jpg__empty.jpg": None,
    "enslo__png__empty.png": None,
    "enslo__webp__empty.webp": None,
    "sdparsers__bad_images__empty_image.jpg": None,
    "sdparsers__bad_images__empty_image.png": None,  # only date:* chunks
}


def _same(found: str | None, expected: str | None) -> bool:
    if isinstance(expected, Prefix):
        return found is not None and found.startswith(expected)
    return found == expected


def test_the_table_covers_every_file():
    assert sorted(EXPECTED) == sorted(p.name for p in SHARED.iterdir())
    assert len(EXPECTED) == 93


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_file_reads_as_a_careful_person_would(name):
    found = read_image((SHARED / name).read_bytes())
    expected = EXPECTED[name]
    if expected is None:
        assert found is None
    elif isinstance(expected, str):
        assert isinstance(found, NoPrompt) and found.reason == expected, found
    else:
        prompt, negative, seed = expected
        assert isinstance(found, PromptInfo), found
        assert found.prompt == prompt
        assert _same(found.negative_prompt, negative), found.negative_prompt
        assert found.gen_meta["seed"] == seed
        assert not found.prompt.lstrip().startswith("{")  # JSON is never a prompt


def test_gen_meta_has_one_layout_whatever_the_generator():
    common = {"tool", "model", "model_hash", "sampler", "scheduler", "steps", "cfg", "seed", "width", "height",
              "denoise", "clip_skip", "loras", "source_meta"}
    tools = set()
    for name, expected in EXPECTED.items():
        if isinstance(expected, tuple):
            meta = read_image((SHARED / name).read_bytes()).gen_meta
            assert set(meta) <= common, (name, set(meta) - common)
            assert isinstance(meta["steps"], int) and isinstance(meta["seed"], int), name
            assert isinstance(meta.get("cfg", 0.0), float), name
            tools.add(meta.get("tool"))
    assert {"a1111", "comfyui", "swarmui", "fooocus", "ruinedfooocus", "novelai", "invokeai", "tensorart",
            "civitai"} <= tools


def test_settings_of_some_files_in_detail():
    def meta(name):
        return {k: v for k, v in read_image((SHARED / name).read_bytes()).gen_meta.items() if k != "source_meta"}

    # `CFG Scale` (capitalised) and a placeholder infotext do not hide the graph's settings
    saver = meta("enslo__png__comfyui-comfy-image-saver.png")
    assert (saver["cfg"], saver["steps"], saver["model"]) == (5.0, 20, "waiIllustriousSDXL_v160.safetensors")
    # rgthree's SDXL latent gives the size as one string; the sampler is reached through a guider
    anima = meta("enslo__png__comfyui-anima.png")
    assert (anima["width"], anima["height"], anima["steps"], anima["cfg"], anima["sampler"]) == (
        1216, 832, 24, 5.0, "euler")
    assert anima["model"] == "anima-preview.safetensors"
    # the first pass of a two-pass graph: its checkpoint and its empty latent
    night = meta("sdparsers__ComfyUI__night_evening_day_morning_cropped.png")
    assert (night["model"], night["width"], night["height"], night["steps"]) == ("Anything-V3.0.ckpt", 704, 1280, 13)
    swarm = meta("enslo__png__swarmui.png")
    assert (swarm["tool"], swarm["cfg"], swarm["model"]) == ("swarmui", 7.0, "waiIllustriousSDXL_v160")
    fooocus = meta("sdparsers__Fooocus__fooocus1_cropped.png")
    assert (fooocus["model"], fooocus["width"], fooocus["height"], fooocus["cfg"]) == (
        "juggernautXL_v8Rundiffusion", 768, 1280, 4.0)
    dream = meta("sdparsers__InvokeAI__invokeai_dream1.png")
    assert (dream["steps"], dream["cfg"], dream["sampler"], dream["width"], dream["height"]) == (
        50, 5.0, "k_lms", 512, 768)
    tensorart = meta("enslo__png__tensorart.png")
    assert (tensorart["tool"], tensorart["model"], tensorart["steps"]) == ("tensorart", "WAI-Nsfw-Illustrious-16", 25)


def test_the_folder_source_over_the_whole_folder():
    source = FolderConfig(path=SHARED, rows_per_shard=40).build()
    items = [i for part in source.list_partitions() for i in source.read_partition(part)]
    assert len(items) == 93
    for item in items:
        name = (item.row if isinstance(item, Drop) else item)["source_id"]
        expected = EXPECTED[name]
        if isinstance(expected, tuple):
            assert not isinstance(item, Drop), (name, item)
            assert item["keyword_prompt_raw"] == expected[0]
            assert json.loads(item["gen_meta"])["seed"] == expected[2]
        else:
            assert isinstance(item, Drop), name
            assert item.reason == (expected or "no_prompt"), (name, item.reason, item.detail)
    kept = sum(isinstance(e, tuple) for e in EXPECTED.values())
    assert sum(not isinstance(i, Drop) for i in items) == kept == 82


def test_bare_comments_are_prompts_only_when_asked_for(tmp_path):
    off = FolderConfig(path=SHARED).build()
    on = FolderConfig(path=SHARED, bare_comments=True).build()
    for name in ("enslo__jpg__gimp.jpg", "enslo__png__gimp.png", "enslo__webp__gimp.webp"):
        (drop,) = off.read_partition([name])
        assert isinstance(drop, Drop) and drop.reason == "no_prompt" and "bare_comments" in drop.detail
        (row,) = on.read_partition([name])
        assert row["keyword_prompt_raw"] == "GIMPで再保存しただけ"


def test_explain_names_every_reader_and_the_row():
    entries = explain([SHARED / "enslo__png__comfyui-comfy-image-saver.png", SHARED / "enslo__png__krea2.png",
                       SHARED / "enslo__png__empty.png"])
    saver, krea, empty = entries
    # the placeholder infotext was read first and set aside; the graph made the row
    assert [r["origin"] for r in saver["readings"]] == ["png:parameters", "comfyui:prompt"]
    assert saver["readings"][0]["reason"] == "prompt_not_stored"
    assert (saver["row"], saver["origin"], saver["reader"], saver["prompt"]) == (
        "kept", "comfyui:prompt", "comfyui", RAW_HEAD)
    assert saver["gen_meta"]["seed"] == 106744160813738
    assert krea["row"] == "dropped" and krea["reason"] == "prompt_not_stored" and "TextGenerate" in krea["detail"]
    assert empty == {"file": str(SHARED / "enslo__png__empty.png"), "readings": [], "row": "dropped",
                     "reason": "no_prompt", "detail": "no embedded metadata and no .json/.txt sidecar"}
