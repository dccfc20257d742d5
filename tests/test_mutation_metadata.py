"""What mutation testing of the metadata readers found untested: every reader's origin, reader name and reason,
the infotext settings line's splitting rules, and the bounds at their limits."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from test_metadata import COMFY_WORKFLOW, POSITIVE, png
from test_metadata_formats import graph, stealth_png
from test_metadata_formats import png as png_of

from surd.sources.bounds import MAX_TEXT_BYTES, OverBound
from surd.sources.infotext import normalise_meta, parse_infotext, parse_prompt_text, parse_settings, parse_size
from surd.sources.metadata import (
    examine,
    exif_user_comment,
    parse_prompt_json,
    read_embedded,
    read_image,
    read_sidecar,
    read_sidecar_txt,
)
from surd.sources.readings import NoPrompt, PromptInfo

SETTINGS = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42"
FOX = "a red fox in the snow"


def exif_image(fmt: str, *, user_comment: bytes | None = None, tags: dict[int, str] | None = None) -> bytes:
    exif = Image.Exif()
    for tag, value in (tags or {}).items():
        exif[tag] = value
    if user_comment is not None:
        exif.get_ifd(0x8769)[0x9286] = user_comment
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buf, fmt, exif=exif.tobytes())
    return buf.getvalue()


# ---- the settings line ------------------------------------------------------------------------------------------


def test_settings_line_keeps_escaped_quotes_and_backslashes_inside_quoted_values():
    line = (r'Steps: 20, Note: "say \"hi, Seed: 5\"", Path: "C:\\sd\\", Wrap: "one\ntwo, three", Sampler: Euler, '
            r'Seed: 1')
    assert parse_settings(line) == {"Steps": "20", "Note": 'say "hi, Seed: 5"', "Path": "C:\\sd\\",
                                    "Wrap": "one\ntwo, three", "Sampler": "Euler", "Seed": "1"}


def test_a_quote_right_after_the_opening_one_closes_it():
    # `x""`: the empty quotes open at 1 and close at 2, so the commas after them split as usual
    assert parse_settings('x"", Steps: 20, Seed: 1, Sampler: Euler') == {"Steps": "20", "Seed": "1",
                                                                        "Sampler": "Euler"}


def test_commas_inside_nested_brackets_never_split():
    line = "Steps: 20, Regions: [[0, 0.5], mask: 1], Seed: 1, Sampler: Euler"
    assert parse_settings(line)["Regions"] == "[[0, 0.5], mask: 1]"
    line = "Steps: 20, Hashes: {a: {b: 1}, c: 2}, Seed: 1, Sampler: Euler"
    assert parse_settings(line) == {"Steps": "20", "Hashes": "{a: {b: 1}, c: 2}", "Seed": "1", "Sampler": "Euler"}


def test_unquoted_backslashes_and_commas_without_spaces():
    assert parse_settings(r"Steps: 20,Model: C:\models\sd15,Seed: 1,Sampler: Euler") == {
        "Steps": "20", "Model": r"C:\models\sd15", "Seed": "1", "Sampler": "Euler"}


def test_an_empty_quoted_value_is_an_empty_string():
    assert parse_settings('Steps: 20, Note: "", Seed: 1')["Note"] == ""
    assert parse_settings('Steps: 20, Note: "x", Seed: 1')["Note"] == "x"


def test_unquoted_commas_rejoin_the_value_before_them_and_leading_junk_is_dropped():
    assert parse_settings("junk, Steps: 20, Sampler: DPM++ 2M, Karras, Seed: 1") == {
        "Steps": "20", "Sampler": "DPM++ 2M, Karras", "Seed": "1"}


def test_a_repeated_key_is_text_of_the_value_before_it():
    assert parse_settings("Steps: 20, Seed: 1, Sampler: a, Steps: 30") == {
        "Steps": "20", "Seed": "1", "Sampler": "a, Steps: 30"}


def test_a_settings_line_needs_three_pairs_and_a_marker_key():
    assert parse_settings("Steps: 20, Seed: 1") is None  # a marker, two pairs
    assert parse_settings("Note: steps: 3, A: 1, B: 2") is None  # three pairs, the marker only inside a value
    assert parse_settings("Note: x, Ab: 1, Steps: 2") == {"Note": "x", "Ab": "1", "Steps": "2"}


def test_parse_size_reads_the_first_64_characters():
    assert parse_size(" " * 60 + "8x8" + "9") == (8, 89)  # 64 characters: all read
    assert parse_size(" " * 61 + "8x8" + "9") == (8, 8)  # the 65th is not


def test_model_objects_give_their_name_in_order():
    def model(value):
        return normalise_meta({"model": value}, keep_source=False).get("model")

    assert model({"model_name": "a", "name": "b", "modelFileName": "c"}) == "a"
    assert model({"model_name": "", "name": "b", "modelFileName": "c"}) == "b"
    assert model({"modelFileName": "c"}) == "c"
    assert model({"other": "d"}) is None


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
def test_infotext_line_ends_of_every_platform(newline):
    text = newline.join(["a fox", "in the snow", "Negative prompt: blurry", SETTINGS])
    info = parse_infotext(text)
    assert (info.prompt, info.negative_prompt, info.gen_meta["seed"]) == ("a fox\nin the snow", "blurry", 42)


def test_a_plain_text_is_read_by_the_text_reader():
    assert parse_prompt_text(FOX) == PromptInfo(FOX, None, {}, "text", "text")


# ---- what each reader answers -----------------------------------------------------------------------------------


def test_comments_without_settings_read_only_when_asked():
    data = png({"Comment": FOX})
    assert examine(data, bare_comments=True) == [PromptInfo(FOX, None, {}, "png:Comment", "comment")]
    assert read_embedded(data) == PromptInfo(FOX, None, {}, "png:Comment", "comment")  # the default asks
    assert read_embedded(data, bare_comments=False) is None
    for refused in (examine(data), [read_image(data)]):  # the default does not
        [found] = refused
        assert (found.reason, found.origin, found.reader) == ("no_prompt", "png:Comment", "comment")
        assert found.detail.endswith("); set bare_comments to read comments as prompts")
    assert read_image(data, bare_comments=True).reader == "comment"
    assert examine(png({"Description": FOX}), bare_comments=True)[0].origin == "png:Description"


def test_a_refused_comment_quotes_its_first_60_characters():
    text = "x" * 60 + "y" * 10
    [found] = examine(png({"Comment": text}))
    assert found.detail.startswith("png:Comment: a comment without generation settings ")
    assert repr("x" * 60) in found.detail and "y" not in found.detail


def test_parameters_without_settings_settings_without_prompt_and_the_comfyui_placeholder():
    assert examine(png({"parameters": FOX})) == [PromptInfo(FOX, None, {}, "png:parameters", "text")]
    [found] = examine(png({"parameters": SETTINGS}))
    assert found == NoPrompt("no_prompt", "png:parameters: generation settings without a prompt", "png:parameters",
                             "a1111", found.gen_meta)
    assert (found.gen_meta["tool"], found.gen_meta["steps"], found.gen_meta["seed"]) == ("a1111", 20, 42)
    [found] = examine(png({"parameters": f"unknown\n{SETTINGS}, Version: ComfyUI"}))
    assert (found.reason, found.origin, found.reader) == ("prompt_not_stored", "png:parameters", "a1111")
    assert "'unknown'" in found.detail
    # the same prompt from A1111 is a prompt; a real prompt from ComfyUI too
    assert read_image(png({"parameters": f"unknown\n{SETTINGS}, Version: v1.10.0"})).prompt == "unknown"
    assert read_image(png({"parameters": f"{FOX}\n{SETTINGS}, Version: ComfyUI"})).prompt == FOX


def test_json_in_no_known_layout_names_the_chunk_it_came_from():
    for key, origin in (("parameters", "png:parameters"), ("parameters-json", "png:parameters-json"),
                        ("Comment", "png:Comment")):
        [found] = examine(png({key: '{"foo": 1}'}))
        assert (found.reason, found.origin) == ("unknown_metadata_format", origin)
        assert found.detail.startswith(f"{origin}: JSON in no known layout"), found.detail
    [found] = examine(png({"Comment": '["a", "b"]', "Software": "NovelAI"}))
    assert (found.reason, found.origin) == ("unknown_metadata_format", "png:Comment")
    assert found.detail.startswith("png:Comment: JSON in no known layout") and found.detail.endswith("keys: list)")
    [found] = examine(png({"Comment": "[" * 100 + "]" * 100}))
    assert (found.reason, found.origin) == ("json_too_deep", "png")
    assert found.detail.startswith("png:Comment: JSON nested deeper")


def test_json_chunks_that_are_not_json_or_too_deep():
    [found] = examine(png({"parameters-json": "{not json"}))
    assert found == NoPrompt("unknown_metadata_format", "png:parameters-json: not JSON", "png:parameters-json")
    [found] = examine(png({"invokeai_metadata": "{not json"}))
    assert found == NoPrompt("unknown_metadata_format", "png:invokeai_metadata: not JSON", "png:invokeai_metadata",
                             "", {"tool": "invokeai"})
    [found] = examine(png({"parameters-json": "[" * 100 + "]" * 100}))
    assert (found.reason, found.origin) == ("json_too_deep", "png")
    assert found.detail.startswith("png:parameters-json: JSON nested deeper")


def test_stability_matrix_parameters_json():
    doc = {"PositivePrompt": FOX, "NegativePrompt": "blurry", "Steps": 30, "CfgScale": 6.5, "Seed": 9}
    [found] = examine(png({"parameters-json": json.dumps(doc)}))
    assert (found.prompt, found.negative_prompt, found.origin, found.reader) == (
        FOX, "blurry", "png:parameters-json", "stability-matrix")
    assert (found.gen_meta["steps"], found.gen_meta["cfg"], found.gen_meta["seed"]) == (30, 6.5, 9)


TENSORART = {"prompt": "a paper boat", "negativePrompt": "lowres", "width": 768, "height": 768, "steps": 20,
             "cfgScale": 6, "seed": "-1", "ksamplerName": "euler", "baseModel": {"modelFileName": "Illustrious"}}


def test_tensorart_record_beside_its_graph():
    """The graph's prompt and settings ran; TensorArt's record names the model and is kept as source_meta."""
    data = png({"prompt": json.dumps(graph(FOX)), "generation_data": json.dumps(TENSORART) + "\0"})
    found = read_image(data)
    assert (found.prompt, found.negative_prompt, found.origin, found.reader) == (
        FOX, "lowres, bad hands", "comfyui:prompt", "tensorart")
    assert (found.gen_meta["tool"], found.gen_meta["model"], found.gen_meta["steps"], found.gen_meta["seed"]) == (
        "tensorart", "Illustrious", 25, 7)
    assert found.gen_meta["source_meta"] == {k: v for k, v in TENSORART.items() if k not in ("prompt",
                                                                                           "negativePrompt")}
    # a record without a model name keeps the graph's checkpoint
    record = {k: v for k, v in TENSORART.items() if k != "baseModel"} | {"baseModel": {}}
    found = read_image(png({"prompt": json.dumps(graph(FOX)), "generation_data": json.dumps(record)}))
    assert (found.gen_meta["tool"], found.gen_meta["model"]) == ("tensorart", "sdxl.safetensors")


def test_tensorart_record_alone_and_only_nul_padding_stripped():
    found = read_image(png({"generation_data": json.dumps(TENSORART) + "\0\0"}))
    assert (found.prompt, found.origin) == ("a paper boat", "png:generation_data")
    found = read_image(png({"generation_data": "X" + json.dumps(TENSORART)}))
    assert (found.reason, found.origin) == ("unknown_metadata_format", "png:generation_data")


def test_the_ui_workflow_is_read_when_the_api_graph_is_unreadable():
    data = png({"prompt": "{not json", "workflow": json.dumps(COMFY_WORKFLOW)})
    readings = examine(data)
    assert [r.origin for r in readings] == ["comfyui:prompt", "comfyui:workflow"]
    assert read_image(data).prompt == POSITIVE


def test_invokeai_and_dream_origins():
    doc = {"positive_prompt": FOX, "negative_prompt": "blurry", "steps": 30, "seed": 5}
    [found] = examine(png({"invokeai_metadata": json.dumps(doc)}))
    assert (found.prompt, found.origin, list(found.gen_meta)[0], found.gen_meta["tool"]) == (
        FOX, "png:invokeai_metadata", "tool", "invokeai")
    [found] = examine(png({"Dream": '"a koi pond" -s 40 -S 77'}))
    assert (found.prompt, found.origin) == ("a koi pond", "png:Dream")
    assert examine(png({"Dream": "not a dream command"})) == []


def test_novelai_comment_by_software_or_by_uc():
    settings = {"steps": 28, "scale": 5, "seed": 8, "sampler": "k_euler"}
    texts = {"Software": "NovelAI", "Comment": json.dumps(settings), "Description": FOX,
             "Source": "NovelAI Diffusion V3 4BDE2A90"}
    [found] = examine(png(texts))
    assert (found.prompt, found.origin, found.reader) == (FOX, "png:Comment", "novelai")
    assert (found.gen_meta["model"], found.gen_meta["steps"], found.gen_meta["seed"]) == (
        "NovelAI Diffusion V3 4BDE2A90", 28, 8)
    # without the Software chunk, `uc` marks NovelAI's settings: the prompt is still the Description
    [found] = examine(png({"Comment": json.dumps({**settings, "uc": "lowres"}), "Description": FOX}))
    assert (found.prompt, found.negative_prompt, found.origin, found.reader) == (FOX, "lowres", "png:Comment",
                                                                               "novelai")


def test_png_parameters_and_exif_are_both_read_in_order():
    info_png = io.BytesIO()
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"ASCII\0\0\0" + FOX.encode()
    text = PngInfo()
    text.add_text("parameters", f"a cat\n{SETTINGS}")
    Image.new("RGB", (16, 16)).save(info_png, "PNG", pnginfo=text, exif=exif.tobytes())
    readings = examine(info_png.getvalue())
    assert [(type(r), r.origin) for r in readings] == [(PromptInfo, "png:parameters"),
                                                       (NoPrompt, "exif:UserComment")]
    assert examine(info_png.getvalue(), bare_comments=True)[1] == PromptInfo(FOX, None, {}, "exif:UserComment",
                                                                             "comment")


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_user_comment_and_image_description_as_comments(fmt):
    data = exif_image(fmt, user_comment=b"ASCII\0\0\0" + FOX.encode())
    [found] = examine(data)
    assert (found.reason, found.origin, found.reader) == ("no_prompt", "exif:UserComment", "comment")
    data = exif_image(fmt, tags={0x010E: FOX})
    [found] = examine(data)
    assert (found.reason, found.origin) == ("no_prompt", "exif:ImageDescription")
    assert examine(data, bare_comments=True) == [PromptInfo(FOX, None, {}, "exif:ImageDescription", "comment")]


def test_exif_user_comment_helper():
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"ASCII\0\0\0" + FOX.encode()
    assert exif_user_comment(exif.tobytes()) == FOX


@pytest.mark.parametrize("tag", [0x010E, 0x0110, 0x010F])  # ImageDescription, Model, Make
def test_comfyui_graphs_in_exif_text_tags(tag):
    [found] = examine(exif_image("WEBP", tags={tag: "prompt:" + json.dumps(graph(FOX))}))
    assert (found.prompt, found.reader) == (FOX, "comfyui")
    assert found.origin == {0x010E: "exif:ImageDescription", 0x0110: "exif:Model", 0x010F: "exif:Make"}[tag]
    [found] = examine(exif_image("WEBP", tags={tag: "workflow:" + json.dumps(COMFY_WORKFLOW)}))
    assert found.prompt == POSITIVE


def test_comfyui_tag_must_start_within_32_characters():
    doc = json.dumps(graph(FOX))
    assert read_image(exif_image("WEBP", tags={0x0110: "prompt" + " " * 25 + ":" + doc})).prompt == FOX  # 32: read
    assert read_image(exif_image("WEBP", tags={0x0110: "prompt" + " " * 26 + ":" + doc})) is None  # 33: not a graph


def test_webp_without_exif_has_no_readings():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "WEBP")
    assert examine(buf.getvalue()) == []


def test_a_known_chunk_over_the_bound_is_named_and_an_unknown_one_is_ignored():
    big = "a" * (MAX_TEXT_BYTES + 1)
    assert examine(png({"parameters": big})) == [NoPrompt(
        "metadata_too_large", f"png metadata 'parameters' is over {MAX_TEXT_BYTES} bytes", "png:parameters")]
    assert examine(png({"my-notes": big, "parameters": f"{FOX}\n{SETTINGS}"}))[0].prompt == FOX


@pytest.mark.parametrize(("fmt", "origin"), [("PNG", "png:eXIf"), ("WEBP", "webp:EXIF")])
def test_an_exif_chunk_over_the_bound_is_named(fmt, origin):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, fmt, exif=b"Exif\0\0" + b"\0" * (MAX_TEXT_BYTES + 1))
    [found] = examine(buf.getvalue())
    assert (found.reason, found.origin) == ("metadata_too_large", origin)


# ---- sidecars and JSON objects ----------------------------------------------------------------------------------


def test_sidecar_size_limit_at_the_limit_and_above():
    assert read_sidecar("a" * MAX_TEXT_BYTES, "txt").prompt == "a" * MAX_TEXT_BYTES
    with pytest.raises(OverBound) as e:
        read_sidecar("a" * (MAX_TEXT_BYTES + 1), "txt")
    assert (e.value.reason, e.value.detail) == (
        "metadata_too_large", f"sidecar:txt: {MAX_TEXT_BYTES + 1} bytes (limit {MAX_TEXT_BYTES})")


def test_sidecar_details_name_the_file_or_the_kind():
    found = read_sidecar('{"foo": 1}', "json")
    assert (found.reason, found.origin) == ("unknown_metadata_format", "sidecar:json")
    assert found.detail.startswith("sidecar:json: JSON in no known layout")
    assert read_sidecar('{"foo": 1}', "txt").detail.startswith("sidecar:txt: JSON in no known layout")
    with pytest.raises(OverBound) as e:
        read_sidecar("[" * 100 + "]" * 100, "json", "a.json")
    assert e.value.detail.startswith("a.json: JSON nested deeper")


def test_txt_sidecar_holding_json():
    assert read_sidecar(json.dumps({"prompt": FOX}), "txt") == PromptInfo(FOX, None, {"source_meta": {}}, "sidecar:txt",
                                                                                 "json")
    assert read_sidecar_txt('{"foo": 1}') is None


def test_parse_prompt_json():
    expected = PromptInfo(FOX, "blurry", {"source_meta": {}}, "", "json")
    assert parse_prompt_json({"prompt": FOX, "negative_prompt": "blurry"}) == expected
    assert parse_prompt_json({"foo": 1}) is None


def test_stealth_metadata_is_read_first_when_no_chunk_gives_a_prompt():
    hidden = Image.open(io.BytesIO(stealth_png(f"a koi pond\n{SETTINGS}")))
    readings = examine(png_of({"Comment": "re-saved in GIMP"}, image=hidden))
    assert [(type(r), r.origin) for r in readings] == [(PromptInfo, "png:stealth"), (NoPrompt, "png:Comment")]
    assert readings[0].prompt == "a koi pond"


def test_a_comment_in_braces_that_is_not_json_is_read_as_text():
    """NovelAI-style emphasis (`{masterpiece}`) makes a plain comment look like JSON; when it does not parse, it is
    the prompt in words (it was answered "JSON in no known layout (keys: NoneType)" and the prompt lost)."""
    text = "{masterpiece}, a red fox in the snow, {blue sky}"
    assert examine(png({"Comment": text}), bare_comments=True) == [
        PromptInfo(text, None, {}, "png:Comment", "comment")]
    [refused] = examine(png({"Comment": text}))
    assert (refused.reason, refused.origin) == ("no_prompt", "png:Comment")
