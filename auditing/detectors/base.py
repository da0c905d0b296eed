"""The detector contract every auditing detector follows.

A detector turns images into one ``DetectorResult`` per image: a score in [0, 1],
whether its rule calls the image unsafe, and the raw per-label scores behind that
decision, so a report can show why. Where a detector localises what it found, it lists
``raw["boxes"]`` as ``[x, y, width, height]`` in pixels (NudeNet's convention), which is
what report redaction blacks out. ``score=None`` means "could not score": the
auditor treats it as an incomplete audit, never as a silent 0 (which would fail open).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class DetectorResult:
    score: float | None
    unsafe: bool | None
    raw: dict = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class Detector:
    """Base class. Subclasses set ``name``, ``version`` and ``rule`` and implement ``detect``;
    a detector with a single cut-off sets ``threshold``, one with weights their ``weights_sha256``."""

    name: str = "base"
    version: str = "0"
    rule: str = ""
    threshold: float | None = None
    weights_sha256: str | None = None

    @classmethod
    def description(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def detect(self, images: list[Image.Image]) -> list[DetectorResult]:
        raise NotImplementedError

    def info(self) -> dict:
        """What a report records about the detector that produced a figure."""
        return {"name": self.name, "version": self.version, "rule": self.rule, "threshold": self.threshold,
                "weights_sha256": self.weights_sha256, "description": self.description()}


def threshold_option(value: float | str) -> float:
    """A probability cut-off given in code or as a ``KEY=VALUE`` option string."""
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in (0, 1) (got {value!r})") from None
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1) (got {threshold})")
    return threshold


def to_bgr(image: Image.Image) -> np.ndarray:
    """OpenCV channel order, which NudeNet 3.4's preprocessing assumes."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
