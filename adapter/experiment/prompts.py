"""The two ways of saying a scene, as SURD has them, both written from the scene's true attributes.

Keyword prompt, the community's style: the attribute words (`red`, `circle`, `small`, `left`) in any order,
some weighted (`(red:1.2)`, `((circle))`), mixed with quality tags, style words and an artist name. The
clean stage turns the weights into plain words, as it does for real prompts.

Narrative prompt, plain speech with *different words*: synonyms (`crimson`, `ball`, `tiny`), other sentence
orders, and positions said as compass directions or relative to the empty space ("with open space to its
east" is an object on the left). No attribute word of the keyword vocabulary appears in a narrative prompt
(tested), so a model that learnt only keywords cannot read one.
"""

from __future__ import annotations

import random

from adapter.experiment.world import Attributes

QUALITY = ("masterpiece", "best quality", "8k", "highly detailed", "sharp focus", "trending on artstation",
           "ultra hd", "award winning", "4k wallpaper", "high resolution")
STYLE = ("flat colors", "minimalism", "vector art", "simple background", "clean lines", "digital art")
ARTISTS = ("greg rutkowski", "artgerm", "alphonse mucha", "wlop", "ilya kuvshinov", "makoto shinkai")
WEIGHTS = ("1.1", "1.2", "1.3", "1.4")

NARRATIVE_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {
        "red": ("crimson", "scarlet", "ruby", "cherry-coloured", "tomato-coloured"),
        "green": ("emerald", "grassy", "leafy", "lime", "jade"),
        "blue": ("azure", "navy", "cobalt", "sapphire", "sky-coloured"),
        "yellow": ("golden", "lemon", "canary", "sunflower", "butter-coloured"),
    },
    "shape": {
        "circle": ("ball", "disc", "dot", "round blob", "coin"),
        "square": ("box", "block", "tile", "cube", "four-cornered slab"),
        "triangle": ("pyramid", "wedge", "three-cornered shape", "arrowhead", "tent shape"),
    },
    "size": {
        "small": ("tiny", "little", "wee", "petite", "miniature"),
        "large": ("big", "huge", "giant", "chunky", "hefty"),
    },
    "position": {
        "left": ("on the west side", "toward the west", "by the western edge", "with open space to its east"),
        "right": ("on the east side", "toward the east", "by the eastern edge", "with open space to its west"),
        "top": ("up high", "near the ceiling", "in the upper half", "with open space beneath it"),
        "bottom": ("down low", "near the floor", "in the lower half", "with open space above it"),
    },
}

NARRATIVE_TEMPLATES = (
    "{a_size} {colour} {shape} {position}",
    "{Position}, there is {a_size} {colour} {shape}",
    "there's {a_colour} {shape} {position}, and it is {size}",
    "{a_shape}, {colour} and {size}, sits {position}",
    "picture {a_size} {shape} painted {colour}, {position}",
    "just {a_colour} {shape} {position}; it looks {size}",
)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _weighted(tag: str, rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.3:
        return f"({tag}:{rng.choice(WEIGHTS)})"
    if roll < 0.4:
        return f"(({tag}))"
    return tag


def keyword_prompt(attributes: Attributes, rng: random.Random) -> str:
    """A raw community-style prompt: attribute tags (some weighted), quality tags, style words, maybe an artist."""
    tags = [attributes["colour"], attributes["shape"], attributes["size"], attributes["position"]]
    if rng.random() < 0.4:  # "red circle" as one tag, as people often write it
        tags = [f"{attributes['colour']} {attributes['shape']}", attributes["size"], attributes["position"]]
    tags = [_weighted(t, rng) for t in tags]
    tags += [_weighted(t, rng) for t in rng.sample(QUALITY, rng.randint(2, 4))]
    tags += rng.sample(STYLE, rng.randint(0, 2))
    if rng.random() < 0.6:
        tags.append(rng.choice(("art by ", "by ")) + rng.choice(ARTISTS))
    rng.shuffle(tags)
    return ", ".join(tags)


def narrative_prompt(attributes: Attributes, rng: random.Random) -> str:
    """A plain sentence about the same scene in the narrative vocabulary."""
    words = {name: rng.choice(NARRATIVE_WORDS[name][value]) for name, value in attributes.items()}
    fields = {**words, "Position": words["position"][0].upper() + words["position"][1:],
              **{f"a_{name}": _article(word) for name, word in words.items()}}
    return rng.choice(NARRATIVE_TEMPLATES).format(**fields)
