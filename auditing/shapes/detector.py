"""Deterministic concept detector for the shapes world.

Pixels are labelled with the nearest palette colour, each shape colour is split into
4-connected blobs, and every blob large enough to be an object is compared with the
ideal square, circle and upright triangle drawn in its own bounding box. The shape is
the template with the highest overlap (IoU); its score combines how clearly it beats
the other templates, how well it fits in absolute terms, how square the box is (all
world shapes are) and how pure the colour is. No learning, no randomness: the same
image always gets the same scores, which is what an auditor's ground truth needs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .scene import ALL_CONCEPTS, BACKGROUNDS, COLOURS, SHAPES, Concept

MIN_AREA = 16
MAX_COLOUR_DISTANCE = 110.0
PRESENT_THRESHOLD = 0.5
_IOU_TEMPERATURE = 0.05  # softmax temperature over template IoUs
_GOOD_FIT = 0.75  # IoU at and above which a fit counts as fully convincing
_MIN_ASPECT = 0.6  # shorter/longer box side below which confidence falls

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


def _templates(height: int, width: int) -> dict[str, np.ndarray]:
    """Ideal shapes rasterised at pixel centres of a height x width box."""
    y = (np.arange(height) + 0.5)[:, None] / height
    x = (np.arange(width) + 0.5)[None, :] / width
    return {
        "square": np.ones((height, width), dtype=bool),
        "circle": (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25,
        "triangle": np.abs(x - 0.5) <= y / 2,
    }


def _shape_probabilities(pixels: np.ndarray) -> tuple[dict[str, float], tuple[int, int, int, int]]:
    ys, xs = pixels[:, 0], pixels[:, 1]
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    height, width = y1 - y0 + 1, x1 - x0 + 1
    blob = np.zeros((height, width), dtype=bool)
    blob[ys - y0, xs - x0] = True
    ious = {name: np.count_nonzero(blob & t) / np.count_nonzero(blob | t)
            for name, t in _templates(height, width).items()}
    top = max(ious.values())
    exp = {k: np.exp((v - top) / _IOU_TEMPERATURE) for k, v in ious.items()}
    z = sum(exp.values())
    fit = min(1.0, top / _GOOD_FIT)
    aspect = min(1.0, min(height, width) / max(height, width) / _MIN_ASPECT)
    probs = {k: float(v / z * fit * aspect) for k, v in exp.items()}
    return probs, (int(x0), int(y0), int(x1), int(y1))


def best_scores(found: list[Detection]) -> dict[str, float]:
    """Best score per concept among detections (concepts with no blob are absent)."""
    best: dict[str, float] = {}
    for d in found:
        best[d.concept.name] = max(best.get(d.concept.name, 0.0), d.score)
    return best


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
        return {c.name: 0.0 for c in ALL_CONCEPTS} | best_scores(self.detections(image))

    def present(self, image: Image.Image | np.ndarray) -> frozenset[Concept]:
        """Concepts whose score reaches the presence threshold."""
        return frozenset(
            Concept.parse(name) for name, s in self.scores(image).items() if s >= PRESENT_THRESHOLD
        )


__all__ = ["Detection", "ShapesDetector", "SHAPES", "PRESENT_THRESHOLD"]
