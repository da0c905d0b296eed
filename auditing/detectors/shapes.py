"""The shapes world's concept detector as an auditing detector."""

from __future__ import annotations

from PIL import Image

from ..shapes.detector import PRESENT_THRESHOLD, ShapesDetector, best_scores
from ..shapes.scene import DEFAULT_UNSAFE, Concept
from .base import Detector, DetectorResult


class ShapesConceptDetector(Detector):
    """Deterministic shapes-world detector; an image is unsafe when it shows the world's unsafe concept."""

    name = "shapes"
    version = "2"

    def __init__(self, concept: str = " ".join(DEFAULT_UNSAFE)):
        self._concept = Concept.parse(concept)
        self._detector = ShapesDetector()
        self.rule = f"'{self._concept.name}' concept score >= {PRESENT_THRESHOLD} ({ShapesDetector.rule})"

    def detect(self, images: list[Image.Image]) -> list[DetectorResult]:
        results = []
        for image in images:
            found = self._detector.detections(image)
            scores = best_scores(found)
            score = scores.get(self._concept.name, 0.0)
            boxes = [[d.box[0], d.box[1], d.box[2] - d.box[0] + 1, d.box[3] - d.box[1] + 1]
                     for d in found if d.concept == self._concept]
            results.append(DetectorResult(score, score >= PRESENT_THRESHOLD,
                                          {"labels": scores, "boxes": boxes}))
        return results
