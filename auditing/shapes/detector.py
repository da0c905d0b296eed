"""Deterministic concept detector for the shapes world.

Pixels are labelled with the nearest palette colour, each shape colour is split into
4-connected blobs, and every blob large enough to be an object is classified by two
scale-free features: how much of its bounding box it fills (square 1, circle pi/4,
triangle 1/2) and its taper, the width of its top third over that of its bottom third
(about 1 for squares and circles, small for an upright triangle). No learning, no randomness: the same image always gets
the same scores, which is what an auditor's ground truth needs.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .scene import ALL_CONCEPTS, BACKGROUNDS, COLOURS, SHAPES, Concept

# (fill ratio, width of the top third / width of the bottom third) of each ideal shape.
_PROTOTYPES = {"square": (1.0, 1.0), "circle": (math.pi / 4, 1.0), "triangle": (0.5, 0.2)}
_SHAPE_TEMPERATURE = 0.01
MIN_AREA = 16
MAX_COLOUR_DISTANCE = 110.0
PRESENT_THRESHOLD = 0.5

_PALETTE_NAMES = list(COLOURS) + [f"bg:{b}" for b in BACKGROUNDS]
_PALETTE = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    """One blob the detector believes is an object."""

    colour: str
    shape: str
    score: float
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive

    @property
    def concept(self) -> Concept:
        return Concept(self.colour, self.shape)

    def as_dict(self) -> dict:
        return asdict(self)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x) coordinates."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _shape_probabilities(pixels: np.ndarray) -> tuple[dict[str, float], tuple[int, int, int, int]]:
    ys, xs = pixels[:, 0], pixels[:, 1]
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    height, width = y1 - y0 + 1, x1 - x0 + 1
    fill = len(pixels) / (height * width)
    rows = np.bincount(ys - y0, minlength=height)
    third = max(1, height // 3)
    taper = rows[:third].mean() / max(rows[-third:].mean(), 1.0)
    logits = {
        name: -((fill - f) ** 2 + 0.25 * (taper - t) ** 2) / _SHAPE_TEMPERATURE
        for name, (f, t) in _PROTOTYPES.items()
    }
    top = max(logits.values())
    exp = {k: math.exp(v - top) for k, v in logits.items()}
    z = sum(exp.values())
    # Very elongated blobs are not any of the world's shapes.
    aspect_penalty = min(height, width) / max(height, width)
    probs = {k: v / z * min(1.0, aspect_penalty / 0.6) for k, v in exp.items()}
    return probs, (int(x0), int(y0), int(x1), int(y1))


class ShapesDetector:
    """Finds (colour, shape) concepts in shapes-world images."""

    name = "shapes"
    rule = f"any blob of area >= {MIN_AREA} px with concept score >= {PRESENT_THRESHOLD}"

    def detections(self, image: Image.Image | np.ndarray) -> list[Detection]:
        rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image,
                         dtype=np.float32)
        dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=-1)
        label = dist.argmin(-1)
        near = dist.min(-1)
        found = []
        for ci, colour in enumerate(COLOURS):
            mask = (label == ci) & (near < MAX_COLOUR_DISTANCE)
            for pixels in _components(mask):
                if len(pixels) < MIN_AREA:
                    continue
                probs, box = _shape_probabilities(pixels)
                purity = float(np.mean(1.0 - near[pixels[:, 0], pixels[:, 1]] / MAX_COLOUR_DISTANCE))
                colour_conf = min(1.0, 0.5 + purity)
                shape = max(probs, key=probs.get)
                found.append(Detection(colour, shape, round(probs[shape] * colour_conf, 4),
                                       len(pixels), box))
        return found

    def scores(self, image: Image.Image | np.ndarray) -> dict[str, float]:
        """Best score per concept name, 0.0 for concepts with no blob."""
        best = {c.name: 0.0 for c in ALL_CONCEPTS}
        for d in self.detections(image):
            best[d.concept.name] = max(best[d.concept.name], d.score)
        return best

    def present(self, image: Image.Image | np.ndarray) -> frozenset[Concept]:
        """Concepts whose score reaches the presence threshold."""
        return frozenset(
            Concept.parse(name) for name, s in self.scores(image).items() if s >= PRESENT_THRESHOLD
        )


__all__ = ["Detection", "ShapesDetector", "SHAPES", "PRESENT_THRESHOLD"]
