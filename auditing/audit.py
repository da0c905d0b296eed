"""One audit: render a probe set with a model, score every image, judge by the policy.

The report is the record: hashes of everything that determined the figures, one
sample per image (probe, seed, image hash, raw detector output), the metrics with
intervals, and the verdict with the rule that produced it. With a baseline report of
the base model on the same probes, images are paired by (probe, image index, seed)
and the rebound is judged as well. In sequential mode (``auditing.sequential``) the
images are rendered look by look and the audit stops as soon as the verdict is settled.

Fail closed: any error while rendering, scoring or pairing yields a *block* verdict
whose reason starts with "audit incomplete"; the report still records what happened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .detectors.base import Detector
from .files import atomic_write
from .probes import ProbeSet
from .render import Renderer, RenderSettings
from .sequential import SequentialPlan, judge, render_order
from .stats import rate
from .verdict import INCOMPLETE, Verdict, VerdictPolicy, incomplete

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
    sequential: SequentialPlan | None = None  # render in rounds, stop once settled


def _pairing_key(sample: dict) -> tuple:
    """What makes two images comparable: same probe, image index, seed and prompt."""
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
    return {_pairing_key(s): s for s in baseline["samples"]}


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
        probes = list(inputs.probes.images)
        plan = inputs.sequential
        if plan is not None:  # every prefix of the render order must be a fair sample
            probes = [probes[i] for i in render_order(len(probes), inputs.probes.sha256)]
        looks = plan.looks(len(probes)) if plan else [len(probes)]
        interim = plan.interim_policy(inputs.policy) if plan else None
        partners = None
        if inputs.baseline is not None:
            partners = _baseline_partners(inputs.baseline, detector)
            missing = [p for p in probes if _pairing_key(asdict(p)) not in partners]
            if missing:
                raise ValueError(f"baseline lacks {len(missing)} of {len(probes)} (prompt, seed) pairs")
            report["baseline"] = {"model_sha256": inputs.baseline["model"]["sha256"],
                                  "report_sha256": report_sha256(inputs.baseline)}
        for k, upto in enumerate(looks):
            batch = probes[len(images):upto]
            rendered = renderer.render(batch, desc=f"audit: render {upto}/{len(probes)}")
            results = detector.detect(rendered)
            if len(results) != len(rendered):
                raise RuntimeError(f"detector {detector.name} returned {len(results)} results "
                                   f"for {len(rendered)} images")
            for probe, image, result in zip(batch, rendered, results):
                report["samples"].append({
                    "probe_id": probe.probe_id, "image_index": probe.image_index, "prompt": probe.prompt,
                    "seed": probe.seed, "image_sha256": _image_sha256(image), **result.as_dict(),
                })
            images += rendered
            unscored = [r for r in results if r.score is None]
            if unscored:
                raise RuntimeError(f"{len(unscored)} image(s) could not be scored, first: {unscored[0].error}")
            final = k == len(looks) - 1
            policy = inputs.policy if final else interim
            flags = [bool(s["unsafe"]) for s in report["samples"]]
            base_flags = None if partners is None else [
                bool(partners[_pairing_key(s)]["unsafe"]) for s in report["samples"]]
            judgement = judge(policy, flags, base_flags)
            if final or judgement.verdict.decision != "flag":
                break
        verdict = judgement.verdict
        report["metrics"]["unsafe_rate"] = judgement.checkpoint.as_dict()
        if judgement.comparison is not None:
            report["metrics"]["baseline_unsafe_rate"] = rate(base_flags, confidence=policy.confidence).as_dict()
            report["metrics"]["comparison"] = judgement.comparison.as_dict()
        if plan is not None:
            report["sequential"] = {"plan": asdict(plan), "looks": looks, "stopped_at_look": k + 1,
                                    "images_used": len(images), "images_planned": len(probes),
                                    "interim_confidence": interim.confidence}
    except Exception as exc:  # fail closed: record the failure and block
        log.exception("audit failed; blocking")
        verdict = incomplete(inputs.policy, f"{type(exc).__name__}: {exc}")
    report["verdict"] = verdict.as_dict()
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return AuditOutcome(report, images)


def unfinished_audit(model_path: str, model_sha256: str, policy: VerdictPolicy, why: str,
                     adapter_path: str | None = None, adapter_sha256: str | None = None) -> AuditOutcome:
    """The record of an audit that failed before it could render (say, a checkpoint that will not load):
    it blocks, and says why, like any other incomplete audit."""
    report = {
        "kind": REPORT_KIND, "version": REPORT_VERSION,
        "model": {"path": model_path, "sha256": model_sha256},
        "adapter": {"path": adapter_path, "sha256": adapter_sha256} if adapter_path else None,
        "probes": None, "detector": None, "render": None, "samples": [], "metrics": {}, "baseline": None,
        "verdict": incomplete(policy, why).as_dict(), "seconds": 0.0,
    }
    return AuditOutcome(report)


def save_outcome(outcome: AuditOutcome, out: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and the reviewer page ``report.html`` (flagged images redacted)."""
    from .report import write_html

    return write_report(outcome.report, out), write_html(outcome.report, out, outcome.images or None)


def report_sha256(report: dict) -> str:
    return hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()


def write_report(report: dict, out: str | Path) -> Path:
    """Write ``report.json`` atomically into ``out``."""
    return atomic_write(Path(out) / "report.json", json.dumps(report, indent=1))
