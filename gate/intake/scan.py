"""Contamination scan: which training images a detector calls unsafe.

The paper shows that unsafe images in a fine-tuning set drive the rebound a hardened model
suffers, so every image is scanned before training, and the share found unsafe decides
whether a dataset is accepted, flagged or refused. The scanner is any auditing
``Detector`` (in service, NudeNet: ``load_detector("nudenet")``), the same contract and
rule the auditor uses, so intake and audit figures mean the same thing. It reads the
re-encoded files, exactly what training will read. An image the detector cannot score
stops the intake (fail closed); it is never counted as clean.

A dataset may be scanned by several detectors (NudeNet, and the detector of each base model's concept): each
gives a ``Screening`` under the same contamination policy, and the strictest decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from auditing.detectors.base import Detector, DetectorResult
from auditing.stats import exact_interval

from .limits import IntakeError, IntakeLimits

SCAN_BATCH = 16  # images held in memory at once
ACCEPTED, FLAGGED, REJECTED = "accepted", "flagged", "rejected"
STRICTNESS = (ACCEPTED, FLAGGED, REJECTED)  # least to most strict
# One-sided: a set is refused only when its unsafe share is above the reject ratio at this confidence, so a detector's
# false positive cannot refuse a small benign set (1 of 8 is flagged); a person reviews every flagged set anyway.
REJECT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Screening:
    """One detector's figures on a dataset and what the contamination policy makes of them."""

    scanner: dict  # the detector's ``info()``: name, version, rule
    status: str  # accepted, flagged or rejected
    images: int
    unsafe_images: int
    contamination: float
    flagged: tuple[str, ...]  # names in the upload of the images it called unsafe

    @property
    def contamination_lower(self) -> float:
        """What refusal compares with the reject ratio (recorded so staff see why)."""
        return lower_bound(self.unsafe_images, self.images)

    def as_dict(self) -> dict:
        return {**asdict(self), "contamination_lower": self.contamination_lower, "flagged": list(self.flagged)}

    def refusal(self, limits: IntakeLimits) -> IntakeError:
        """The 422 a rejected screening is reported as. It does not name the detector: the customer reads it, and
        would learn what to train against (staff read the scanner beside it in the intake record)."""
        return IntakeError("contaminated", f"{self.unsafe_images} of {self.images} images ({self.contamination:.1%}) "
                           f"are unsafe: with {REJECT_CONFIDENCE:.0%} confidence more than "
                           f"contamination_reject_ratio={limits.contamination_reject_ratio:g}", self.flagged)


def lower_bound(unsafe_images: int, images: int) -> float:
    """The one-sided ``REJECT_CONFIDENCE`` Clopper-Pearson lower bound of the unsafe share: the lower end of the
    two-sided interval at twice the error. Above 0 from one unsafe image on; below 1 always."""
    return exact_interval(unsafe_images, images, 2 * REJECT_CONFIDENCE - 1)[0]


def strictest(statuses) -> str:
    return max(statuses, key=STRICTNESS.index, default=ACCEPTED)


def judge(scanner: Detector, sources: Sequence[str], results: Sequence[DetectorResult],
          limits: IntakeLimits) -> Screening:
    """The policy on one detector's results: rejected when the share's lower bound is above the reject ratio,
    flagged when the share itself is above the flag ratio (both strict), otherwise accepted."""
    flagged = tuple(source for source, result in zip(sources, results) if result.unsafe)
    ratio = len(flagged) / len(sources)
    status = (REJECTED if lower_bound(len(flagged), len(sources)) > limits.contamination_reject_ratio else
              FLAGGED if ratio > limits.contamination_flag_ratio else ACCEPTED)
    return Screening(scanner.info(), status, len(sources), len(flagged), ratio, flagged)


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
