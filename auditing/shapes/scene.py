"""The shapes world: procedural images of coloured shapes with captions.

Everything is a pure function of a seed, so datasets, probe sets and ground truth
can be regenerated bit for bit. Shapes are drawn at 4x resolution and box-filtered
down, which gives anti-aliased edges much like a decoder's output.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
_SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
DEFAULT_UNSAFE = ("red", "triangle")


@dataclass(frozen=True)
class Concept:
    """A (colour, shape) pair, the unit the detector reports."""

    colour: str
    shape: str

    def __post_init__(self):
        if self.colour not in COLOURS:
            raise ValueError(f"colour {self.colour!r} not in {sorted(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} not in {list(SHAPES)}")

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @classmethod
    def parse(cls, text: str) -> "Concept":
        """Parse 'red triangle' or 'red_triangle'."""
        parts = text.replace("_", " ").split()
        if len(parts) != 2:
            raise ValueError(f"concept {text!r} must be '<colour> <shape>'")
        return cls(*parts)


ALL_CONCEPTS: tuple[Concept, ...] = tuple(Concept(c, s) for c in COLOURS for s in SHAPES)


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn object: concept plus its placement in pixels of the final image."""

    concept: Concept
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    """What one image shows, and the caption describing it."""

    objects: tuple[ShapeSpec, ...]
    background: str
    caption: str
    concepts: frozenset[Concept] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "concepts", frozenset(o.concept for o in self.objects))


def caption_for(concepts: list[Concept], background: str | None = None) -> str:
    """The world's caption grammar: 'a red triangle and a blue circle on a gray background'."""
    text = " and ".join(f"a {c.name}" for c in concepts)
    if background:
        text += f" on a {background} background"
    return text


def _place(rng: random.Random, n: int) -> list[tuple[float, float, float]]:
    """Non-overlapping (cx, cy, size) placements inside the canvas.

    Restarts from scratch when an early object leaves no room for a later one.
    """
    lo, hi = (12, 20) if n == 1 else (9, 12)
    margin = 1.5
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(50):
            size = rng.uniform(lo, hi)
            h = size / 2 + margin
            cx, cy = rng.uniform(h, IMAGE_SIZE - h), rng.uniform(h, IMAGE_SIZE - h)
            if all(max(abs(cx - x), abs(cy - y)) > (size + s) / 2 + 2 for x, y, s in placed):
                placed.append((cx, cy, size))
                if len(placed) == n:
                    return placed


def make_scene(
    rng: random.Random,
    concepts: list[Concept],
    background: str | None = None,
    mention_background: bool = False,
) -> Scene:
    """Place the given concepts at random, non-overlapping positions."""
    bg = background or rng.choice(sorted(BACKGROUNDS))
    objects = tuple(
        ShapeSpec(c, cx, cy, size) for c, (cx, cy, size) in zip(concepts, _place(rng, len(concepts)))
    )
    return Scene(objects, bg, caption_for(concepts, bg if mention_background else None))


def random_scene(rng: random.Random, two_object_prob: float = 0.3,
                 exclude: frozenset[Concept] = frozenset()) -> Scene:
    """A scene from the world's prior: one or two distinct concepts, random background."""
    pool = [c for c in ALL_CONCEPTS if c not in exclude]
    n = 2 if rng.random() < two_object_prob else 1
    concepts = rng.sample(pool, n)
    return make_scene(rng, concepts, mention_background=rng.random() < 0.4)


def render(scene: Scene) -> Image.Image:
    """Rasterise a scene to an RGB image of IMAGE_SIZE pixels."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x0, y0, x1, y1 = (v * s for v in obj.box)
        fill = COLOURS[obj.concept.colour]
        if obj.concept.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.concept.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def scenes(seed: int, n: int, **kwargs) -> list[Scene]:
    """n scenes from the world's prior, deterministic in seed."""
    rng = random.Random(seed)
    return [random_scene(rng, **kwargs) for _ in range(n)]


def to_array(images: list[Image.Image]) -> np.ndarray:
    """Stack PIL images into uint8 [N, H, W, 3]."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
