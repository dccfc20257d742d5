"""The `shapes` world: one flat object on a plain background, its attributes known for every image.

    shape     circle | square | triangle
    colour    red | green | blue | yellow
    size      small | large
    position  left | right | top | bottom     (where the object's centre sits)

96 combinations. A quarter of them (24: those whose value indices sum to a multiple of 4) never reach any
training set (the dataset, the base model, the adapters): the compositional held-out set. Every pair of values
of any two attributes still appears in training (at least 4 of its 6 or 8 combinations), so a held-out prompt
asks for a new combination of things each seen together, never for an unseen pair.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator

from PIL import Image, ImageDraw

Attributes = dict[str, str]

COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 89, 220), "yellow": (240, 200, 20)}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle"),
    "colour": tuple(COLOURS),
    "size": ("small", "large"),
    "position": ("left", "right", "top", "bottom"),
}

RADIUS = {"small": 0.13, "large": 0.26}  # half the object's extent, as a share of the image side
CENTRE = {"left": (0.29, 0.5), "right": (0.71, 0.5), "top": (0.5, 0.29), "bottom": (0.5, 0.71)}
SUPERSAMPLE = 4  # drawn 4x larger, then downsampled: anti-aliased edges, as a generator would produce


def chance(attribute: str) -> float:
    """Accuracy of a uniform guess."""
    return 1 / len(ATTRIBUTES[attribute])


def combinations() -> list[Attributes]:
    """All 96 attribute combinations, in a fixed order."""
    names = list(ATTRIBUTES)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*ATTRIBUTES.values())]


def is_held_out(attributes: Attributes) -> bool:
    return sum(ATTRIBUTES[name].index(value) for name, value in attributes.items()) % 4 == 0


def split_combinations() -> tuple[list[Attributes], list[Attributes]]:
    """(seen, held-out) combinations."""
    every = combinations()
    return [a for a in every if not is_held_out(a)], [a for a in every if is_held_out(a)]


def cycle(combos: list[Attributes], n: int, rng: random.Random) -> Iterator[Attributes]:
    """`n` combinations, each used equally often (up to one), in a shuffled order."""
    pool: list[Attributes] = []
    for _ in range(n):
        if not pool:
            pool = list(combos)
            rng.shuffle(pool)
        yield pool.pop()


def render(attributes: Attributes, rng: random.Random, side: int = 32) -> Image.Image:
    """One scene; position, size, colour and background jitter a little, the attributes never change."""
    big = side * SUPERSAMPLE
    tone = rng.randint(222, 246)
    image = Image.new("RGB", (big, big), (tone, tone, min(255, tone + rng.randint(-4, 4))))
    draw = ImageDraw.Draw(image)
    cx, cy = CENTRE[attributes["position"]]
    cx, cy = (cx + rng.uniform(-0.05, 0.05)) * big, (cy + rng.uniform(-0.05, 0.05)) * big
    r = RADIUS[attributes["size"]] * rng.uniform(0.9, 1.1) * big
    fill = tuple(max(0, min(255, c + rng.randint(-18, 18))) for c in COLOURS[attributes["colour"]])
    shape = attributes["shape"]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.88  # same area feel as the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        turn, t = rng.uniform(-0.15, 0.15), r * 1.2  # a point up, slightly turned, its bounding box centred
        corners = (0, 2 * math.pi / 3, 4 * math.pi / 3)
        points = [(cx + t * math.sin(a + turn), cy + 0.15 * t - t * math.cos(a + turn)) for a in corners]
        draw.polygon(points, fill=fill)
    return image.resize((side, side), Image.LANCZOS)
