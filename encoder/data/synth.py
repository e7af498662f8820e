"""Built-in captioned scenes, deterministic from (seed, index).

Three kinds of scene, each with a rich caption that names what is there and a short alt-text-like label
(OpenVision v1 needs both):

- shapes: 1-3 groups of coloured shapes (colour, size, shape, count 1-3, position on a 3 x 3 grid);
- text:   one word rendered in a colour with a font bundled with matplotlib;
- chart:  a bar chart with 3-5 labelled bars and integer values.

`make_scene(seed, index)` returns a `Scene`; the same arguments always give the same pixels and text.
Train and held-out sets come from different seeds. Everything is drawn with PIL, no GPU, ~1 ms a scene.

This module owns the scene vocabulary (COLOURS, SHAPES, POSITIONS, WORDS, TEXT_COLOURS, CHART_COLOURS) and the
held-out rule: `is_heldout(scene)` marks the scenes no training set may contain (a held-out (colour, shape) pair of
HELDOUT_SHAPES, a word in its held-out colour, a chart of a held-out (bar colour, bar count) pairing); the bridge's
training sets skip them and the benchmark suite (benchmarks/evals/suite) is drawn from them alone.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "orange": (240, 130, 20),
    "purple": (140, 50, 170),
    "black": (20, 20, 20),
    "pink": (240, 120, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245), "gray": (170, 170, 170), "beige": (225, 210, 180),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = ("small", "large")
POSITIONS = {  # name -> (column, row) on a 3 x 3 grid
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "centre": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
WORDS = (
    "apple", "river", "cloud", "tiger", "house", "green", "music", "paper", "light", "stone",
    "table", "bread", "chair", "ocean", "plant", "train", "smile", "candy", "robot", "zebra",
)
TEXT_COLOURS = ("red", "blue", "black", "green", "purple")  # the colours words are written in
CHART_COLOURS = ("blue", "red", "green", "orange", "purple")  # and bars are filled with
# (colour, shape) pairs no training scene contains: each colour once, each shape at least once
HELDOUT_SHAPES = frozenset({("red", "star"), ("green", "circle"), ("blue", "diamond"), ("yellow", "square"),
                            ("orange", "triangle"), ("purple", "star"), ("black", "circle"), ("pink", "diamond")})
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
KINDS = ("shapes", "text", "chart")


@dataclass
class Scene:
    image: Image.Image
    caption: str  # rich description, several clauses
    alt: str  # short label, like web alt-text
    kind: str
    objects: list[dict] = field(default_factory=list)  # shapes: colour/shape/size/count/position
    meta: dict = field(default_factory=dict)  # text: word, colour; chart: labels, values


@functools.cache
def _font(px: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    import matplotlib

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", name), px)


def an(word: str) -> str:
    """"a red", "an orange"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def where(position: str) -> str:
    """"in the centre", "on the left", "at the top right": a grid position as the captions and questions say it."""
    return "in the centre" if position == "centre" else f"on the {position}" if position in ("left", "right") \
        else f"at the {position}"


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + ("es" if word.endswith("s") else "s")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "star":
        angles = np.arange(10) * np.pi / 5 - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        draw.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _shapes_scene(rng: np.random.Generator, size: int, max_groups: int) -> Scene:
    bg_name = str(rng.choice(list(BACKGROUNDS)))
    image = Image.new("RGB", (size, size), BACKGROUNDS[bg_name])
    draw = ImageDraw.Draw(image)
    n_groups = int(rng.integers(1, max_groups + 1))
    cells = rng.choice(len(POSITIONS), size=n_groups, replace=False)
    objects, clauses = [], []
    for cell in cells:
        position = list(POSITIONS)[int(cell)]
        col, row = POSITIONS[position]
        colour = str(rng.choice([c for c in COLOURS if COLOURS[c] != BACKGROUNDS[bg_name]]))
        shape, size_name = str(rng.choice(SHAPES)), str(rng.choice(SIZES))
        count = int(rng.choice([1, 1, 2, 3])) if size_name == "small" else 1
        cell_px = size / 3
        r = cell_px * (0.42 if size_name == "large" else 0.2)
        cx0, cy0 = (col + 0.5) * cell_px, (row + 0.5) * cell_px
        offsets = {1: [(0, 0)], 2: [(-0.22, 0), (0.22, 0)], 3: [(-0.22, 0.2), (0.22, 0.2), (0, -0.22)]}[count]
        jitter = rng.uniform(-0.05, 0.05, size=2) * cell_px
        for dx, dy in offsets:
            _draw_shape(draw, shape, cx0 + dx * cell_px + jitter[0], cy0 + dy * cell_px + jitter[1], r, COLOURS[colour])
        objects.append(dict(colour=colour, shape=shape, size=size_name, count=count, position=position))
        head = an(size_name) if count == 1 else f"{NUMBER_WORDS[count]} {size_name}"
        clauses.append(f"{head} {colour} {_plural(shape, count)} {where(position)}")
    caption = " and ".join(clauses) + f" on a {bg_name} background."
    alt = ", ".join(f"{o['colour']} {_plural(o['shape'], o['count'])}" for o in objects)
    return Scene(image, caption, alt, "shapes", objects, {"background": bg_name})


def _text_scene(rng: np.random.Generator, size: int) -> Scene:
    bg_name = str(rng.choice(list(BACKGROUNDS)))
    colour = str(rng.choice(list(TEXT_COLOURS)))
    word = str(rng.choice(WORDS))
    image = Image.new("RGB", (size, size), BACKGROUNDS[bg_name])
    draw = ImageDraw.Draw(image)
    font = _font(max(8, int(size * rng.uniform(0.2, 0.26))), bold=True)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    x = rng.uniform(0, max(1.0, size - (right - left))) - left
    y = rng.uniform(0, max(1.0, size - (bottom - top))) - top
    draw.text((x, y), word, fill=COLOURS[colour], font=font)
    caption = f'the word "{word}" written in {colour} letters on a {bg_name} background.'
    return Scene(image, caption, f"{word} text", "text", [], {"word": word, "colour": colour, "background": bg_name})


def _chart_scene(rng: np.random.Generator, size: int) -> Scene:
    n = int(rng.integers(3, 6))
    labels = [chr(ord("A") + i) for i in range(n)]
    values = [int(v) for v in rng.integers(1, 10, size=n)]
    colour = str(rng.choice(list(CHART_COLOURS)))
    image = Image.new("RGB", (size, size), BACKGROUNDS["white"])
    draw = ImageDraw.Draw(image)
    font = _font(max(6, size // 10))
    base, top, margin = size * 0.85, size * 0.08, size * 0.08
    draw.line([(margin, base), (size - margin / 2, base)], fill=(0, 0, 0), width=1)
    slot = (size - 1.5 * margin) / n
    for i, (label, value) in enumerate(zip(labels, values)):
        x0 = margin + i * slot + slot * 0.15
        draw.rectangle([x0, base - (base - top) * value / 9, x0 + slot * 0.7, base], fill=COLOURS[colour])
        draw.text((x0 + slot * 0.2, base + 1), label, fill=(0, 0, 0), font=font)
    best = int(np.argmax(values))
    caption = (
        f"{an(colour)} bar chart with {NUMBER_WORDS[n]} bars; the tallest bar is {labels[best]} with value "
        f"{values[best]}. values: " + ", ".join(f"{lab} {val}" for lab, val in zip(labels, values)) + "."
    )
    return Scene(image, caption, "bar chart", "chart", [], {"labels": labels, "values": values, "colour": colour})


def make_scene(seed: int, index: int, size: int = 64, kinds: tuple[str, ...] = KINDS, max_groups: int = 3) -> Scene:
    """The scene number `index` of the stream `seed`; the kind is drawn from `kinds`."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"unknown scene kinds {sorted(unknown)}; choose from {KINDS}")
    rng = np.random.default_rng([int(seed), int(index)])
    kind = kinds[int(rng.integers(len(kinds)))] if len(kinds) > 1 else kinds[0]
    if kind == "shapes":
        return _shapes_scene(rng, size, max_groups)
    if kind == "text":
        return _text_scene(rng, size)
    return _chart_scene(rng, size)


def is_heldout(scene: Scene) -> bool:
    """True for scenes reserved for evaluation: a held-out (colour, shape) group; a word in its held-out colour
    ((word index + colour index) % 5 == 0); a chart whose (bar colour index + bar count) % 5 == 0. About a fifth
    of text and chart scenes and a fifth of shape groups."""
    if scene.kind == "shapes":
        return any((o["colour"], o["shape"]) in HELDOUT_SHAPES for o in scene.objects)
    if scene.kind == "text":
        return (WORDS.index(scene.meta["word"]) + TEXT_COLOURS.index(scene.meta["colour"])) % 5 == 0
    return (CHART_COLOURS.index(scene.meta["colour"]) + len(scene.meta["values"])) % 5 == 0
