"""Procedural pictures for the demo data: simple scenes drawn with PIL, different enough to hash apart."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from PIL import Image, ImageDraw

Colour = tuple[int, int, int]


def _colour(rng: random.Random, lo: int = 0, hi: int = 255) -> Colour:
    return (rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))


def _gradient(size: tuple[int, int], top: Colour, bottom: Colour, axis: int = 1) -> Image.Image:
    """A linear gradient; drawn as a 1-px strip then stretched (fast)."""
    n = size[axis]
    strip = Image.new("RGB", (1, n) if axis == 1 else (n, 1))
    strip.putdata([tuple(int(a + (b - a) * i / max(n - 1, 1)) for a, b in zip(top, bottom, strict=True))
                   for i in range(n)])
    return strip.resize(size, Image.NEAREST)


def _sky_mountains(im: Image.Image, d: ImageDraw.ImageDraw, rng: random.Random) -> str:
    w, h = im.size
    im.paste(_gradient(im.size, _colour(rng, 120, 255), _colour(rng, 0, 120)))
    sun = [rng.randint(0, w // 2), rng.randint(0, h // 4), w // 2 + rng.randint(0, w // 3), h // 2]
    d.ellipse(sun, fill=(255, 220, 120))
    for layer in range(3):
        base = h * (5 + layer) // 8
        ridge = [(x, base - rng.randint(0, h // 3)) for x in range(0, w + 1, w // rng.randint(3, 6))]
        d.polygon([(0, h), *ridge, (w, h)], fill=_colour(rng, 20 + 30 * layer, 90 + 40 * layer))
    return "mountains"


def _city(im: Image.Image, d: ImageDraw.ImageDraw, rng: random.Random) -> str:
    w, h = im.size
    im.paste(_gradient(im.size, (10, 0, 30), _colour(rng, 60, 160)))
    x = 0
    while x < w:
        bw, bh = rng.randint(w // 12, w // 5), rng.randint(h // 4, h * 4 // 5)
        d.rectangle([x, h - bh, x + bw, h], fill=_colour(rng, 10, 60))
        neon = rng.choice([(255, 0, 200), (0, 255, 255), (255, 240, 0)])
        for wy in range(h - bh + 8, h - 8, 14):
            if rng.random() < 0.5 and bw > 8:
                d.rectangle([x + 4, wy, x + bw - 4, wy + 5], fill=neon)
        x += bw + rng.randint(0, 8)
    return "city"


def _ocean(im: Image.Image, d: ImageDraw.ImageDraw, rng: random.Random) -> str:
    w, h = im.size
    horizon = rng.randint(h // 4, h // 2)
    im.paste(_gradient((w, horizon), _colour(rng, 80, 200), (230, 230, 250)), (0, 0))
    sea = _colour(rng, 0, 90)
    d.rectangle([0, horizon, w, h], fill=sea)
    for i in range(12):
        y = horizon + (h - horizon) * i // 12
        amp, phase = rng.randint(2, 10), rng.random() * 6
        pts = [(x, y + amp * math.sin(x / 15 + phase)) for x in range(0, w + 1, 8)]
        d.line(pts, fill=tuple(min(255, c + 80) for c in sea), width=3)
    bx = rng.randint(w // 8, w * 5 // 8)
    d.polygon([(bx, horizon + 20), (bx + w // 6, horizon + 20), (bx + w // 12, horizon - h // 4)], fill=(250, 250, 240))
    return "ocean"


def _forest(im: Image.Image, d: ImageDraw.ImageDraw, rng: random.Random) -> str:
    w, h = im.size
    im.paste(_gradient(im.size, _colour(rng, 100, 200), (20, 40, 20)))
    for _ in range(rng.randint(8, 16)):
        x, tw = rng.randint(-20, w), rng.randint(w // 10, w // 4)
        top = rng.randint(0, h // 2)
        d.polygon([(x, h), (x + tw, h), (x + tw // 2, top)], fill=(0, rng.randint(60, 160), rng.randint(0, 60)))
    for _ in range(30):
        x, y, r = rng.randint(0, w), rng.randint(h // 2, h), rng.randint(1, 4)
        d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 150))
    return "forest"


def _portrait(im: Image.Image, d: ImageDraw.ImageDraw, rng: random.Random) -> str:
    w, h = im.size
    d.rectangle([0, 0, w, h], fill=_colour(rng))
    cx, cy = w // 2 + rng.randint(-w // 6, w // 6), h // 2
    d.ellipse([cx - w // 2, h * 3 // 4, cx + w // 2, h * 3 // 2], fill=_colour(rng, 0, 120))
    d.ellipse([cx - w // 3, cy - h // 2.5, cx + w // 3, cy - h // 2.5 + h * 0.55], fill=(200, 60, 20))
    d.ellipse([cx - w // 5, cy - h // 4, cx + w // 5, cy + h // 6], fill=(240, 200, 170))
    for ex in (cx - w // 12, cx + w // 12):
        d.ellipse([ex - 6, cy - h // 12, ex + 6, cy - h // 12 + 10], fill=_colour(rng, 0, 100))
    return "portrait"


def _space(im: Image.Image, d: ImageDraw.ImageDraw, rng: random.Random) -> str:
    w, h = im.size
    d.rectangle([0, 0, w, h], fill=(5, 5, 20))
    for _ in range(200):
        x, y = rng.randint(0, w), rng.randint(0, h)
        d.point((x, y), fill=(255, 255, 255))
    r = rng.randint(w // 6, w // 3)
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_colour(rng, 60, 255))
    d.ellipse([cx - 2 * r, cy - r // 4, cx + 2 * r, cy + r // 4], outline=(220, 200, 160), width=4)
    return "space"


def _abstract(im: Image.Image, d: ImageDraw.ImageDraw, rng: random.Random) -> str:
    w, h = im.size
    d.rectangle([0, 0, w, h], fill=_colour(rng, 180, 255))
    for _ in range(rng.randint(4, 9)):
        x0, y0 = rng.randint(-w // 4, w), rng.randint(-h // 4, h)
        s = rng.randint(w // 6, w // 2)
        shape = rng.choice([d.ellipse, d.rectangle])
        shape([x0, y0, x0 + s, y0 + s], fill=_colour(rng))
    return "abstract"


def _desert(im: Image.Image, d: ImageDraw.ImageDraw, rng: random.Random) -> str:
    w, h = im.size
    im.paste(_gradient(im.size, (250, 200, 120), (120, 170, 230)))
    sun = rng.randint(w // 6, w * 5 // 6)
    d.ellipse([sun - w // 10, h // 10, sun + w // 10, h // 10 + w // 5], fill=(255, 250, 220))
    for i in range(4):
        base = h // 2 + i * h // 9
        pts = [(x, base + 20 * math.sin(x / (30 + 10 * i) + rng.random() * 6)) for x in range(0, w + 1, 6)]
        d.polygon([(0, h), *pts, (w, h)], fill=(200 - 25 * i, 150 - 20 * i, 80 - 10 * i))
    return "desert"


def _flowers(im: Image.Image, d: ImageDraw.ImageDraw, rng: random.Random) -> str:
    w, h = im.size
    d.rectangle([0, 0, w, h // 3], fill=(90, 160, 240))
    d.rectangle([0, h // 3, w, h], fill=(40, 130, 40))
    for _ in range(rng.randint(10, 25)):
        x, y, r = rng.randint(0, w), rng.randint(h // 3, h), rng.randint(6, 18)
        d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 210, 0))
        d.ellipse([x - r // 3, y - r // 3, x + r // 3, y + r // 3], fill=(90, 50, 10))
    return "flowers"


def _interior(im: Image.Image, d: ImageDraw.ImageDraw, rng: random.Random) -> str:
    w, h = im.size
    d.rectangle([0, 0, w, h], fill=(70, 40, 25))
    for shelf in range(rng.randint(3, 6)):
        y = 10 + shelf * h // 6
        x = rng.randint(0, w // 3)
        while x < w - 10:
            bw = rng.randint(4, 12)
            d.rectangle([x, y, x + bw, y + h // 8], fill=_colour(rng, 40, 220))
            x += bw + 1
    fx = rng.randint(0, w // 2)
    d.rectangle([fx, h * 2 // 3, fx + w // 3, h], fill=(30, 20, 20))
    d.ellipse([fx + 10, h * 3 // 4, fx + w // 3 - 10, h - 5], fill=(255, 140, 0))
    return "interior"


Painter = Callable[[Image.Image, ImageDraw.ImageDraw, random.Random], str]
SCENES: list[Painter] = [_sky_mountains, _city, _ocean, _forest, _portrait, _space, _abstract, _desert, _flowers,
                         _interior]


def draw_scene(index: int, rng: random.Random, side: int | tuple[int, int]) -> tuple[Image.Image, str]:
    """(image, theme) of scene `index` (cycling through the painters), drawn with `rng`."""
    size = (side, side) if isinstance(side, int) else side
    image = Image.new("RGB", size)
    theme = SCENES[index % len(SCENES)](image, ImageDraw.Draw(image), rng)
    return image, theme


def bench_image(rng: random.Random) -> tuple[Image.Image, str]:
    """A small (64-128 px) blocky random picture: cheap to draw, and its perceptual hash is near random."""
    cells = Image.new("RGB", (6, 6))
    cells.putdata([_colour(rng) for _ in range(36)])
    side = rng.randint(64, 128)
    return cells.resize((side, side), Image.NEAREST), rng.choice(["city", "mountains", "ocean", "forest", "space"])
