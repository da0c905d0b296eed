"""One audit: render a probe set with a model, score every image, judge by the policy.

The report is the record: hashes of everything that determined the figures, one
sample per image (probe, seed, image hash, raw detector output), the metrics with
intervals, and the verdict with the rule that produced it. With a baseline report of
the base model on the same probes, images are paired by (probe, image index, seed)
and the rebound is judged as well.

Fail closed: any error while rendering, scoring or pairing yields a *block* verdict
whose reason starts with "audit incomplete"; the report still records what happened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .detectors.base import Detector
from .probes import ProbeSet
from .render import Renderer, RenderSettings
from .stats import paired_comparison, rate
from .verdict import INCOMPLETE, Verdict, VerdictPolicy, decide, incomplete

log = logging.getLogger(__name__)

REPORT_KIND = "ftgate.audit-report"
REPORT_VERSION = 1


@dataclass(frozen=True)
class AuditInputs:
    model_path: str
    model_sha256: str
    probes: ProbeSet
    policy: VerdictPolicy = field(default_factory=VerdictPolicy)
    render: RenderSettings = field(default_factory=RenderSettings)
    baseline: dict | None = None  # a previous report of the base model on the same probes
    adapter_path: str | None = None  # already applied to the pipeline; recorded here
    adapter_sha256: str | None = None


def _sample_key(sample: dict) -> tuple:
    return (sample["probe_id"], sample["image_index"], sample["seed"], sample["prompt"])


def _image_sha256(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def _baseline_partners(baseline: dict, detector: Detector) -> dict[tuple, dict]:
    """The baseline's samples by pairing key, after checking it is comparable."""
    if baseline.get("kind") != REPORT_KIND:
        raise ValueError("baseline is not an ftgate audit report")
    if baseline["detector"]["rule"] != detector.rule:
        raise ValueError(f"baseline scored with rule {baseline['detector']['rule']!r}, this audit with "
                         f"{detector.rule!r}")
    if any(r.startswith(INCOMPLETE) for r in baseline["verdict"]["reasons"]):
        raise ValueError("baseline report is itself incomplete")
    return {_sample_key(s): s for s in baseline["samples"]}


@dataclass(frozen=True)
class AuditOutcome:
    """The report (the record) and the rendered images (auditor-internal, unredacted)."""

    report: dict
    images: list = field(default_factory=list)


def run_audit(pipe, detector: Detector, inputs: AuditInputs, cache_dir: str | Path | None = None) -> AuditOutcome:
    """Render, detect, compare, decide. Never raises for audit failures: they block."""
    t0 = time.perf_counter()
    renderer = Renderer(pipe, inputs.model_sha256, inputs.adapter_sha256, settings=inputs.render,
                        cache_dir=cache_dir)
    report = {
        "kind": REPORT_KIND, "version": REPORT_VERSION,
        "model": {"path": inputs.model_path, "sha256": inputs.model_sha256},
        "adapter": ({"path": inputs.adapter_path, "sha256": inputs.adapter_sha256}
                    if inputs.adapter_path else None),
        "probes": inputs.probes.summary(), "detector": detector.info(), "render": renderer.info(),
        "samples": [], "metrics": {}, "baseline": None,
    }
    verdict: Verdict
    images: list = []
    try:
        images = renderer.render(list(inputs.probes.images), desc="audit: render")
        results = detector.detect(images)
        if len(results) != len(images):
            raise RuntimeError(f"detector {detector.name} returned {len(results)} results for {len(images)} images")
        for probe, image, result in zip(inputs.probes.images, images, results):
            report["samples"].append({
                "probe_id": probe.probe_id, "image_index": probe.image_index, "prompt": probe.prompt,
                "seed": probe.seed, "image_sha256": _image_sha256(image), **result.as_dict(),
            })
        unscored = [s for s in report["samples"] if s["score"] is None]
        if unscored:
            raise RuntimeError(f"{len(unscored)} image(s) could not be scored, first: {unscored[0]['error']}")
        flags = [bool(s["unsafe"]) for s in report["samples"]]
        checkpoint = rate(flags, confidence=inputs.policy.confidence)
        report["metrics"]["unsafe_rate"] = checkpoint.as_dict()
        comparison = None
        if inputs.baseline is not None:
            partners = _baseline_partners(inputs.baseline, detector)
            missing = [s for s in report["samples"] if _sample_key(s) not in partners]
            if missing:
                raise ValueError(f"baseline lacks {len(missing)} of {len(flags)} (prompt, seed) pairs")
            base_flags = [bool(partners[_sample_key(s)]["unsafe"]) for s in report["samples"]]
            comparison = paired_comparison(base_flags, flags, confidence=inputs.policy.confidence)
            report["metrics"]["baseline_unsafe_rate"] = rate(base_flags, confidence=inputs.policy.confidence).as_dict()
            report["metrics"]["comparison"] = comparison.as_dict()
            report["baseline"] = {"model_sha256": inputs.baseline["model"]["sha256"],
                                  "report_sha256": report_sha256(inputs.baseline)}
        verdict = decide(inputs.policy, checkpoint, comparison)
    except Exception as exc:  # fail closed: record the failure and block
        log.exception("audit failed; blocking")
        verdict = incomplete(inputs.policy, f"{type(exc).__name__}: {exc}")
    report["verdict"] = verdict.as_dict()
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return AuditOutcome(report, images if len(images) == len(report["samples"]) else [])


def report_sha256(report: dict) -> str:
    return hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()


def write_report(report: dict, out: str | Path) -> Path:
    """Write ``report.json`` atomically into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    tmp = out / "report.json.partial"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)
    return path
