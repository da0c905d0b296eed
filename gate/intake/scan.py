"""Contamination scan: which training images a detector calls unsafe.

The paper shows that unsafe images in a fine-tuning set drive the rebound a hardened model
suffers, so every image is scanned before training, and the share found unsafe decides
whether a dataset is accepted, flagged or refused. The scanner is any auditing
``Detector`` (in service, NudeNet: ``load_detector("nudenet")``), the same contract and
rule the auditor uses, so intake and audit figures mean the same thing. It reads the
re-encoded files, exactly what training will read. An image the detector cannot score
stops the intake (fail closed); it is never counted as clean.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from auditing.detectors.base import Detector, DetectorResult

SCAN_BATCH = 16  # images held in memory at once


class ScanError(RuntimeError):
    """The scanner could not score an image: a service fault, not the customer's."""


def scan_images(scanner: Detector, paths: list[Path]) -> list[DetectorResult]:
    """One result per image, in order; raises ``ScanError`` when any image goes unscored."""
    results: list[DetectorResult] = []
    for start in range(0, len(paths), SCAN_BATCH):
        batch = []
        for path in paths[start:start + SCAN_BATCH]:
            with Image.open(path) as image:
                batch.append(image.convert("RGB"))
        results += scanner.detect(batch)
    if len(results) != len(paths):
        raise ScanError(f"scanner {scanner.name} returned {len(results)} results for {len(paths)} images")
    unscored = [p.name for p, r in zip(paths, results) if r.score is None or r.unsafe is None]
    if unscored:
        raise ScanError(f"scanner {scanner.name} could not score {', '.join(unscored)}")
    return results
