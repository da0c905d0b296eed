"""Detectors by name: ``load_detector("nudenet", rule="i2p")``.

Any of them can score IP (the gating metric) or US (the second metric); see docs/auditing.md.

Entries are import paths, so listing detectors costs nothing and a detector's heavy
dependencies load only when it is used.
"""

from __future__ import annotations

from importlib import import_module

from .base import Detector

DETECTORS: dict[str, str] = {
    "nudenet": "auditing.detectors.nudenet:NudeNetDetector",
    "opennsfw": "auditing.detectors.opennsfw:OpenNsfwDetector",
    "mhsc": "auditing.detectors.mhsc:MhscDetector",
    "shapes": "auditing.detectors.shapes:ShapesConceptDetector",
}
DEFAULT_US_CLASSIFIER = "opennsfw"  # ships its weights, so US is computed without operator files


def detector_class(name: str) -> type[Detector]:
    if name not in DETECTORS:
        raise ValueError(f"detector {name!r} not in {sorted(DETECTORS)}")
    module, cls = DETECTORS[name].split(":")
    return getattr(import_module(module), cls)


def load_detector(name: str, **options) -> Detector:
    return detector_class(name)(**options)
