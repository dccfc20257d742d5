"""Deterministic offline demo data: drawn images with prompts embedded the way real tools embed them.

`make_demo_data(out)` writes a folder for the `folder` source: AUTOMATIC1111 PNG `parameters`, ComfyUI
`prompt` + `workflow` PNGs, JPEG/WebP EXIF UserComment, a JPEG comment, `.txt`/`.json` sidecars, and planted
problems so every collect/clean/dedup drop reason shows up (see `PLANTED`). `make_imagefolder_demo(out)`
writes the original SURD layout; `make_bench_images(out, n)` writes many small images for benchmarks.

    python -m surd.demo OUT [--seed N]
"""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageEnhance
from PIL.PngImagePlugin import PngInfo

from surd.demo.art import SCENES, bench_image, draw_scene
from surd.demo.prompts import comfy_graphs, infotext, keyword_prompt, long_prompt, narrative_for, negative_prompt
from surd.errors import SurdError

MARKER = ".surd-demo"  # written into a demo folder; a non-empty folder without it is never written to

# Rows each planted problem should cost, by the stage reason that drops them.
PLANTED = {
    "no_prompt": 1,  # collect
    "empty_prompt": 1,  # clean
    "prompt_too_short": 1,
    "prompt_too_long": 1,
    "image_too_small": 2,
    "undecodable_image": 1,
    "duplicate_image": 1,  # dedup
    "duplicate_pair": 1,
    "near_duplicate_image": 3,
}
EXPECTED_KEPT = 21


def _prepare(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SurdError(f"demo: {out} is not empty and was not written by `surd.demo`; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by surd.demo; safe to delete\n")


class _Writer:
    """Writes files under `out` and counts them by kind."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.counts: dict[str, int] = {}

    def write(self, rel: str, data: bytes, kind: str) -> bytes:
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return data


def png_bytes(image: Image.Image, texts: dict[str, str] | None = None) -> bytes:
    """PNG with text chunks as A1111/ComfyUI write them (PngInfo: tEXt, or iTXt for non-Latin-1 text)."""
    info = PngInfo()
    for key, value in (texts or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, "PNG", pnginfo=info if texts else None)
    return buf.getvalue()


def user_comment(text: str, encoding: str = "unicode-be") -> bytes:
    """EXIF UserComment bytes: `UNICODE\\0` + UTF-16 (piexif writes big-endian), or `ASCII\\0\\0\\0` + text."""
    if encoding == "ascii":
        return b"ASCII\0\0\0" + text.encode("ascii", "replace")
    return b"UNICODE\0" + text.encode("utf-16-le" if encoding == "unicode-le" else "utf-16-be")


def exif_bytes(comment: bytes) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment  # Exif IFD -> UserComment, as piexif.dump writes it
    return exif.tobytes()


def encoded(image: Image.Image, fmt: str, *, exif: bytes | None = None, comment: str | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {"quality": 90}
    if exif is not None:
        kwargs["exif"] = exif
    if comment is not None:
        kwargs["comment"] = comment.encode()
    image.convert("RGB").save(buf, fmt, **kwargs)
    return buf.getvalue()


def make_demo_data(out: Path, seed: int = 0) -> dict[str, Any]:
    """Write the demo folder (deterministic for a given seed); returns counts and the planted problems."""
    out = Path(out)
    _prepare(out)
    w = _Writer(out)
    scenes = iter(range(len(SCENES) * 4))

    def scene(side: int | tuple[int, int]) -> tuple[Image.Image, str, random.Random]:
        index = next(scenes)
        rng = random.Random(f"{seed}:{index}")
        image, theme = draw_scene(index, rng, side)
        return image, theme, rng

    kept: dict[str, tuple[Image.Image, str]] = {}  # originals of the near-duplicates
    # AUTOMATIC1111 / Forge PNGs
    for i in range(6):
        image, theme, rng = scene(rng_side(seed, i))
        prompt = keyword_prompt(theme, rng, multiline=(i == 0), unicode=(i == 1))
        text = infotext(prompt, negative_prompt(rng), rng, image.size, loras=(i == 2))
        w.write(f"a1111/{i:05d}.png", png_bytes(image, {"parameters": text}), "a1111_png")
        kept[f"a1111/{i}"] = (image, theme)
    # ComfyUI PNGs: prompt + workflow, and one with the workflow only
    for i in range(4):
        image, theme, rng = scene(rng_side(seed, 10 + i))
        graph, workflow = comfy_graphs(keyword_prompt(theme, rng), negative_prompt(rng), rng, image.size, lora=(i == 1))
        texts = {"prompt": json.dumps(graph), "workflow": json.dumps(workflow)}
        if i == 3:
            del texts["prompt"]
        w.write(f"comfyui/ComfyUI_{i:05d}_.png", png_bytes(image, texts), "comfyui_png")
        kept[f"comfyui/{i}"] = (image, theme)
    # JPEG / WebP with the infotext in EXIF UserComment
    for i, (fmt, enc) in enumerate([("JPEG", "unicode-be"), ("JPEG", "ascii"), ("JPEG", "unicode-le"),
                                    ("WEBP", "unicode-be"), ("WEBP", "unicode-be")]):
        image, theme, rng = scene(rng_side(seed, 20 + i))
        text = infotext(keyword_prompt(theme, rng), negative_prompt(rng), rng, image.size)
        ext = "jpg" if fmt == "JPEG" else "webp"
        w.write(f"exif/{i:05d}.{ext}", encoded(image, fmt, exif=exif_bytes(user_comment(text, enc))), f"exif_{ext}")
    image, theme, rng = scene(320)  # a comment is read as a prompt when it carries settings (or when asked)
    text = infotext(keyword_prompt(theme, rng), negative_prompt(rng), rng, image.size)
    w.write("misc/comment.jpg", encoded(image, "JPEG", comment=text), "jpeg_comment")
    # sidecars: plain .txt, infotext .txt, .json (two spellings of the negative prompt key)
    image, theme, rng = scene(300)
    w.write("sidecars/plain.png", png_bytes(image), "sidecar_image")
    w.write("sidecars/plain.txt", keyword_prompt(theme, rng).encode(), "sidecar_txt")
    image, theme, rng = scene(288)
    w.write("sidecars/infotext.jpg", encoded(image, "JPEG"), "sidecar_image")
    text = infotext(keyword_prompt(theme, rng), negative_prompt(rng), rng, image.size)
    w.write("sidecars/infotext.txt", text.encode(), "sidecar_txt")
    for i, key in enumerate(["negative_prompt", "negativePrompt"]):
        image, theme, rng = scene(272 + 16 * i)
        name = f"sidecars/meta_{i}.{'png' if i == 0 else 'webp'}"
        w.write(name, png_bytes(image) if i == 0 else encoded(image, "WEBP"), "sidecar_image")
        meta = {"prompt": keyword_prompt(theme, rng), key: negative_prompt(rng), "seed": rng.randrange(2**32),
                "steps": 30, "sampler": "DPM++ 2M Karras", "model": "dreamshaper_8"}
        w.write(name.rsplit(".", 1)[0] + ".json", json.dumps(meta, indent=2).encode(), "sidecar_json")
    _plant_duplicates(w, scene, kept, seed)
    _plant_problems(w, scene)
    files = sum(1 for p in out.rglob("*") if p.is_file() and p.name != MARKER)
    return {"files": files, "by_kind": dict(sorted(w.counts.items())), "planted": dict(PLANTED),
            "expected_kept": EXPECTED_KEPT}


def rng_side(seed: int, i: int) -> int:
    """Image sides between 256 and 512, varied but deterministic."""
    return 256 + 32 * (random.Random(f"side:{seed}:{i}").randrange(9))


def _plant_duplicates(w: _Writer, scene: Any, kept: dict[str, tuple[Image.Image, str]], seed: int) -> None:
    # the same file at another path: same image, same prompt -> duplicate_pair
    w.write("duplicates/copy_of_a1111_00000.png", (w.out / "a1111/00000.png").read_bytes(), "duplicate")
    # byte-identical images with different sidecar prompts -> duplicate_image
    image, theme, rng = scene(320)
    data = png_bytes(image)
    for name in ("scan_a", "scan_b"):
        w.write(f"duplicates/{name}.png", data, "duplicate")
        w.write(f"duplicates/{name}.txt", keyword_prompt(theme, rng).encode(), "sidecar_txt")
    # near-duplicates: re-encoded, slightly resized, slightly brighter -> near_duplicate_image
    rng = random.Random(f"near:{seed}")
    original, theme = kept["a1111/1"]
    text = infotext(keyword_prompt(theme, rng), negative_prompt(rng), rng, original.size)
    w.write("near/reencoded.jpg", encoded(original, "JPEG", exif=exif_bytes(user_comment(text))), "near_duplicate")
    original, theme = kept["a1111/3"]
    small = original.resize((original.width * 9 // 10, original.height * 9 // 10), Image.LANCZOS)
    text = infotext(keyword_prompt(theme, rng), negative_prompt(rng), rng, small.size)
    w.write("near/resized.png", png_bytes(small, {"parameters": text}), "near_duplicate")
    original, theme = kept["comfyui/0"]
    brighter = ImageEnhance.Brightness(original).enhance(1.06)
    text = infotext(keyword_prompt(theme, rng), negative_prompt(rng), rng, brighter.size)
    w.write("near/brighter.png", png_bytes(brighter, {"parameters": text}), "near_duplicate")


def _plant_problems(w: _Writer, scene: Any) -> None:
    for name, side in (("tiny_48.png", 48), ("tiny_strip.png", (200, 40))):
        image, theme, rng = scene(side)
        text = infotext(keyword_prompt(theme, rng), negative_prompt(rng), rng, image.size)
        w.write(f"problems/{name}", png_bytes(image, {"parameters": text}), "problem")
    image, theme, rng = scene(320)
    data = png_bytes(image)
    w.write("problems/truncated.png", data[: len(data) * 3 // 5], "problem")
    w.write("problems/truncated.txt", keyword_prompt(theme, rng).encode(), "sidecar_txt")
    image, _, _ = scene(300)
    w.write("problems/no_prompt.png", png_bytes(image), "problem")
    cases = {
        "only_loras.png": "<lora:add_detail:0.8>, <lora:epiNoiseoffset_v2:0.5>, BREAK, (:1.2)",
        "too_short.png": "a cat",
        "too_long.png": None,
    }
    for name, prompt in cases.items():
        image, theme, rng = scene(288)
        text = infotext(prompt if prompt is not None else long_prompt(rng), negative_prompt(rng), rng, image.size)
        w.write(f"problems/{name}", png_bytes(image, {"parameters": text}), "problem")


def make_imagefolder_demo(out: Path, seed: int = 0, n: int = 6) -> dict[str, Any]:
    """The original SURD release layout: images + metadata.jsonl (`file_name`, `text`, `prompt`)."""
    out = Path(out)
    _prepare(out)
    lines = []
    for i in range(n):
        rng = random.Random(f"imagefolder:{seed}:{i}")
        image, theme = draw_scene(i, rng, 256)
        name = f"{i:04d}.png" if i % 3 else f"more/{i:04d}.jpg"
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(image) if name.endswith(".png") else encoded(image, "JPEG"))
        lines.append({"file_name": name, "text": narrative_for(theme, rng), "prompt": keyword_prompt(theme, rng)})
    (out / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"images": n, "lines": len(lines)}


def make_bench_images(out: Path, n: int, seed: int = 0) -> dict[str, Any]:
    """`n` small (64-128 px), distinct PNGs with A1111 parameters, 1,000 per subfolder; fast to write."""
    out = Path(out)
    _prepare(out)
    rng = random.Random(f"bench:{seed}")
    for i in range(n):
        image, theme = bench_image(rng)
        text = infotext(keyword_prompt(theme, rng), negative_prompt(rng), rng, image.size)
        path = out / f"{i // 1000:04d}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        info = PngInfo()
        info.add_text("parameters", text)
        image.save(path, "PNG", pnginfo=info, compress_level=1)
    return {"images": n}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m surd.demo", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (created; must be empty or an earlier demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--imagefolder", action="store_true", help="write the SURD imagefolder layout instead")
    args = parser.parse_args(argv)
    try:
        make = make_imagefolder_demo if args.imagefolder else make_demo_data
        counts = make(args.out, seed=args.seed)
    except SurdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(counts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
