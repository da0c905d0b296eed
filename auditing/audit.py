"""One audit: render a probe set with a model, score every image, judge by the policy.

The report is the record: hashes of everything that determined the figures, one
sample per image (probe, seed, categories, image hash and render-cache key, raw detector output, and for a
paired image its base model's image and results), the metrics
with intervals, and the verdict with the rule that produced it. Two metrics: IP, the rate
the detector's rule flags (what the policy judges), and, when a US classifier is given, US,
the rate that classifier flags on the same images (reported with its interval and rebound;
judged too only under a policy with ``judge_us``). I2P probe sets also get both rates per
category. With a baseline report of the base model on the same probes, images are paired
by (probe, image index, seed) and the rebound is judged as well. In sequential mode
(``auditing.sequential``) the images are rendered look by look and the audit stops as soon
as the verdict is settled. Scoring overlaps rendering: while the pipeline renders one batch, a background
thread scores the previous one and writes it to the render cache, in the same order and with the same
results as scoring them one after the other.

Fail closed: any error while rendering, scoring or pairing yields a *block* verdict
whose reason starts with "audit incomplete"; the report still records what happened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .detectors.base import Detector
from .files import atomic_write
from .job_probes import FAMILIES, PROFILE
from .probes import ProbeSet
from .render import RenderedChunk, Renderer, RenderSettings
from .sequential import SequentialPlan, judge, render_order
from .stats import rate
from .verdict import DECISIONS, Verdict, VerdictPolicy, combine, incomplete, is_incomplete

log = logging.getLogger(__name__)

MODEL_CHECK = "model check"  # the verdict's ``family`` when the model-side check decided
REPORT_KIND = "ftgate.audit-report"
REPORT_VERSION = 2  # 2: US (us_classifier, samples[].us, us_* metrics), categories, render dtype
# Rendered batches that may wait for the scoring thread: enough that neither side idles on a jitter, few enough
# that the images in flight stay bounded.
SCORING_DEPTH = 2
# What a paired sample keeps of its base model's sample (under ``base``): the image's cache key and hash, and the
# results the redaction of that image is decided on.
PARTNER_FIELDS = ("image_key", "image_sha256", "score", "unsafe", "raw", "us")


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
    adapter_scale: float = 1.0  # the LoRA scale it was fused at
    sequential: SequentialPlan | None = None  # render in rounds, stop once settled


def _pairing_key(sample: dict) -> tuple:
    """What makes two images comparable: same probe, image index, seed and prompt."""
    return (sample["probe_id"], sample["image_index"], sample["seed"], sample["prompt"])


def image_sha256(image) -> str:
    """What a report records of an image's pixels (and what a served render is checked against)."""
    return hashlib.sha256(image.tobytes()).hexdigest()


def _pixel_settings(render: dict) -> dict:
    """What a baseline's images must share with ours (a version-1 report rendered in float32)."""
    return {"dtype": "float32", **{k: v for k, v in render["settings"].items() if k != "batch_size"},
            "scheduler": render["scheduler"]}


def _baseline_partners(baseline: dict, detector: Detector, us_classifier: Detector | None,
                       render: dict) -> dict[tuple, dict]:
    """The baseline's samples by pairing key, after checking it is comparable."""
    if baseline.get("kind") != REPORT_KIND:
        raise ValueError("baseline is not an ftgate audit report")
    if baseline["detector"]["rule"] != detector.rule:
        raise ValueError(f"baseline scored with rule {baseline['detector']['rule']!r}, this audit with "
                         f"{detector.rule!r}")
    if us_classifier is not None:
        theirs = baseline.get("us_classifier") or {}
        if (theirs.get("rule"), theirs.get("weights_sha256")) != (us_classifier.rule, us_classifier.weights_sha256):
            raise ValueError(f"baseline scored US with {theirs.get('name')!r} ({theirs.get('rule')!r}), this audit "
                             f"with {us_classifier.name!r} ({us_classifier.rule!r}) or other weights")
    if is_incomplete(baseline["verdict"]["reasons"]):
        raise ValueError("baseline report is itself incomplete")
    if _pixel_settings(baseline["render"]) != _pixel_settings(render):
        raise ValueError(f"baseline rendered with {_pixel_settings(baseline['render'])}, this audit with "
                         f"{_pixel_settings(render)}")
    return {_pairing_key(s): s for s in baseline["samples"]}


def category_rates(samples: list[dict], confidence: float) -> dict[str, dict]:
    """IP and US rates (with intervals) of the images of each probe category (I2P's ``categories``)."""
    by_category: dict[str, list[dict]] = {}
    for s in samples:
        for c in s["categories"]:
            if c:
                by_category.setdefault(c, []).append(s)
    return {c: {"images": len(group),
                "ip": rate([bool(s["unsafe"]) for s in group], confidence=confidence).as_dict(),
                "us": (rate([bool(s["us"]["unsafe"]) for s in group], confidence=confidence).as_dict()
                       if group[0]["us"] is not None else None)}
            for c, group in sorted(by_category.items())}


@dataclass(frozen=True)
class AuditOutcome:
    """The report (the record) and the rendered images (auditor-internal, unredacted)."""

    report: dict
    images: list = field(default_factory=list)


class _Scorer:
    """Runs scoring jobs on one background thread, in the order submitted, while the caller renders the next
    batch; at most ``depth`` wait, so memory stays bounded. ``depth`` 0 runs each in the caller's thread (the
    serial reference the overlap is checked against). A job's error is raised by the next ``submit`` or
    ``drain``, so it fails the audit like an error in rendering."""

    def __init__(self, depth: int):
        if depth < 0:
            raise ValueError(f"scoring depth must be >= 0 (got {depth})")
        self._depth, self._pending = depth, deque()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="audit-scoring") if depth else None

    def submit(self, job: Callable, *args) -> None:
        if self._pool is None:
            job(*args)
            return
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(job, *args))

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> _Scorer:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self._pool is not None:  # after a failure, queued jobs are dropped and a running one is not waited for
            self._pool.shutdown(wait=exc_type is None, cancel_futures=True)


def _score(renderer: Renderer, detector: Detector, us_classifier: Detector | None, chunk: RenderedChunk,
           results: list, us_results: list) -> None:
    """Cache a chunk's fresh renders and score them, into ``results`` and ``us_results`` at the chunk's indices."""
    renderer.store(chunk)
    ip = _detect(detector, chunk.images)
    us = _detect(us_classifier, chunk.images) if us_classifier else [None] * len(chunk.images)
    for i, a, b in zip(chunk.indices, ip, us):
        results[i], us_results[i] = a, b


def run_audit(pipe, detector: Detector, inputs: AuditInputs, cache_dir: str | Path | None = None,
              us_classifier: Detector | None = None, scoring_depth: int = SCORING_DEPTH) -> AuditOutcome:
    """Render, detect, compare, decide. Never raises for audit failures: they block.

    ``detector`` gives IP; ``us_classifier``, when given, scores the same images for US. ``scoring_depth``:
    rendered batches that may wait for the scoring thread (0: score in this thread, between renders).
    """
    t0 = time.perf_counter()
    report = {
        "kind": REPORT_KIND, "version": REPORT_VERSION,
        "model": {"path": inputs.model_path, "sha256": inputs.model_sha256},
        "adapter": ({"path": inputs.adapter_path, "sha256": inputs.adapter_sha256, "scale": inputs.adapter_scale}
                    if inputs.adapter_path else None),
        "probes": inputs.probes.summary(), "detector": detector.info(),
        "us_classifier": us_classifier.info() if us_classifier else None, "render": None,
        "samples": [], "metrics": {}, "baseline": None,
    }
    verdict: Verdict
    images: list = []
    try:
        adapter = inputs.adapter_sha256  # the cache keys an adapter by what was applied: file and scale
        if adapter is not None and inputs.adapter_scale != 1.0:
            adapter = f"{adapter}@{inputs.adapter_scale:g}"
        renderer = Renderer(pipe, inputs.model_sha256, adapter, settings=inputs.render, cache_dir=cache_dir)
        report["render"] = renderer.info()
        probes = list(inputs.probes.images)
        plan = inputs.sequential
        if plan is not None:  # every prefix of the render order must be a fair sample
            probes = [probes[i] for i in render_order(len(probes), inputs.probes.sha256)]
        looks = plan.looks(len(probes)) if plan else [len(probes)]
        interim = plan.interim_policy(inputs.policy) if plan else None
        partners = None
        if inputs.baseline is not None:
            partners = _baseline_partners(inputs.baseline, detector, us_classifier, report["render"])
            missing = [p for p in probes if _pairing_key(asdict(p)) not in partners]
            if missing:
                raise ValueError(f"baseline lacks {len(missing)} of {len(probes)} (prompt, seed) pairs")
            report["baseline"] = {"model_sha256": inputs.baseline["model"]["sha256"],
                                  "report_sha256": report_sha256(inputs.baseline)}
        samples = report["samples"]
        with _Scorer(scoring_depth) as scorer:
            for k, upto in enumerate(looks):
                batch = probes[len(images):upto]
                rendered, results, us_results = [None] * len(batch), [None] * len(batch), [None] * len(batch)
                for chunk in renderer.chunks(batch, desc=f"audit: render {upto}/{len(probes)}"):
                    for i, image in zip(chunk.indices, chunk.images):
                        rendered[i] = image
                    scorer.submit(_score, renderer, detector, us_classifier, chunk, results, us_results)
                scorer.drain()
                for probe, image, result, us_result in zip(batch, rendered, results, us_results):
                    samples.append({
                        "probe_id": probe.probe_id, "image_index": probe.image_index, "prompt": probe.prompt,
                        "seed": probe.seed, "categories": list(probe.categories), "image_sha256": image_sha256(image),
                        "image_key": renderer.key(probe), **result.as_dict(),
                        "us": us_result.as_dict() if us_result else None,
                    })
                images += rendered
                for who, scored in ((detector, results), (us_classifier, us_results)):
                    unscored = [r for r in scored if r is not None and r.score is None]
                    if unscored:  # recorded above, then the audit is incomplete
                        raise RuntimeError(f"{len(unscored)} image(s) could not be scored by {who.name}, "
                                           f"first: {unscored[0].error}")
                final = k == len(looks) - 1
                policy = inputs.policy if final else interim
                ip = judge(policy, [bool(s["unsafe"]) for s in samples],
                           None if partners is None else [bool(partners[_pairing_key(s)]["unsafe"]) for s in samples])
                us = None if us_classifier is None else judge(
                    policy, [bool(s["us"]["unsafe"]) for s in samples],
                    None if partners is None else [bool(partners[_pairing_key(s)]["us"]["unsafe"]) for s in samples])
                verdict = combine({"IP": ip.verdict, "US": us.verdict}) if us and policy.judge_us else ip.verdict
                if final or verdict.decision != "flag":
                    break
        if partners is not None:  # each pair's base image and results, for the reviewers' side-by-side view
            for s in samples:
                s["base"] = {name: partners[_pairing_key(s)].get(name) for name in PARTNER_FIELDS}
        report["metrics"] = _metrics(ip, us, samples, partners, policy)
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


def _detect(detector: Detector, images: list) -> list:
    results = detector.detect(images)
    if len(results) != len(images):
        raise RuntimeError(f"detector {detector.name} returned {len(results)} results for {len(images)} images")
    return results


def _metrics(ip, us, samples: list[dict], partners: dict | None, policy: VerdictPolicy) -> dict:
    """IP (``unsafe_rate``), US (``us_rate``), their baselines and rebounds, and per-category rates."""
    metrics = {"unsafe_rate": ip.checkpoint.as_dict()}
    if ip.comparison is not None:
        metrics["baseline_unsafe_rate"] = rate([bool(partners[_pairing_key(s)]["unsafe"]) for s in samples],
                                               confidence=policy.confidence).as_dict()
        metrics["comparison"] = ip.comparison.as_dict()
    if us is not None:
        metrics["us_rate"] = us.checkpoint.as_dict()
        if us.comparison is not None:
            metrics["baseline_us_rate"] = rate([bool(partners[_pairing_key(s)]["us"]["unsafe"]) for s in samples],
                                               confidence=policy.confidence).as_dict()
            metrics["us_comparison"] = us.comparison.as_dict()
    categories = category_rates(samples, policy.confidence)
    if categories:
        metrics["categories"] = categories
    return metrics


def unfinished_audit(model_path: str, model_sha256: str, policy: VerdictPolicy, why: str,
                     adapter_path: str | None = None, adapter_sha256: str | None = None) -> AuditOutcome:
    """The record of an audit that failed before it could render (say, a checkpoint that will not load):
    it blocks, and says why, like any other incomplete audit."""
    report = {
        "kind": REPORT_KIND, "version": REPORT_VERSION,
        "model": {"path": model_path, "sha256": model_sha256},
        "adapter": {"path": adapter_path, "sha256": adapter_sha256} if adapter_path else None,
        "probes": None, "detector": None, "us_classifier": None, "render": None, "samples": [], "metrics": {},
        "baseline": None,
        "verdict": incomplete(policy, why).as_dict(), "seconds": 0.0,
    }
    return AuditOutcome(report)


def _strictest(outcomes: list[tuple], rank: Callable) -> tuple:
    """The (key, outcome) whose verdict is strictest, ties broken by ``rank(key)`` (lowest first)."""
    return max(outcomes, key=lambda ko: (DECISIONS.index(ko[1].report["verdict"]["decision"]), -rank(ko[0])))


def audit_families(pipe, detector: Detector, inputs: AuditInputs,
                   families: dict[str, tuple[ProbeSet, Callable[[], dict]]], drawn: dict,
                   cache_dir: str | Path | None = None, us_classifier: Detector | None = None) -> AuditOutcome:
    """Audit on the profile's probes (``inputs``) and on each job probe family (``auditing.job_probes``), each
    paired with the base model's renders of the same probes (``families[name] = (probes, baseline)``, the
    baseline report produced when first asked for), and judge them as one: the strictest family's verdict,
    its reasons naming the family. Once a family blocks, the rest are not rendered."""
    outcomes = [(PROFILE, run_audit(pipe, detector, inputs, cache_dir, us_classifier))]
    for name, (probes, baseline) in families.items():
        if outcomes[-1][1].report["verdict"]["decision"] == "block":
            break
        try:
            family_inputs = replace(inputs, probes=probes, baseline=baseline())
        except Exception as exc:  # the base model's renders failed: this family, and so the audit, is incomplete
            log.exception("baseline of the %s probes failed; blocking", name)
            outcomes.append((name, unfinished_audit(inputs.model_path, inputs.model_sha256, inputs.policy,
                                                    f"baseline of the {name} probes: {type(exc).__name__}: {exc}",
                                                    inputs.adapter_path, inputs.adapter_sha256)))
            continue
        outcomes.append((name, run_audit(pipe, detector, family_inputs, cache_dir, us_classifier)))
    family, chosen = _strictest(outcomes, FAMILIES.index)
    report = dict(outcomes[0][1].report)  # the profile's record, with every family's samples and figures
    verdict = chosen.report["verdict"]
    reasons = verdict["reasons"] if family == PROFILE else [f"{family} probes: {r}" for r in verdict["reasons"]]
    report["verdict"] = {**verdict, "reasons": reasons, "family": family}
    report["samples"] = [{**s, "family": name} for name, o in outcomes for s in o.report["samples"]]
    report["families"] = {name: {"images": len(o.report["samples"]), "probes": o.report["probes"],
                                 "verdict": o.report["verdict"], "metrics": o.report["metrics"],
                                 "baseline": o.report["baseline"], "sequential": o.report.get("sequential"),
                                 "seconds": o.report["seconds"]}
                          for name, o in outcomes}
    report["job_probes"] = drawn
    report["seconds"] = round(sum(o.report["seconds"] for _, o in outcomes), 2)
    return AuditOutcome(report, [image for _, o in outcomes for image in o.images])


def with_model_check(outcome: AuditOutcome, check: dict) -> AuditOutcome:
    """The audit with the model-side check (``auditing.model_check``) as one more judged signal: when its
    decision is stricter than the renders', it decides, its reasons prefixed "model check"."""
    report = {**outcome.report, "model_check": check}
    verdict = report["verdict"]
    if DECISIONS.index(check["decision"]) > DECISIONS.index(verdict["decision"]):
        report["verdict"] = {**verdict, "decision": check["decision"], "family": MODEL_CHECK,
                             "reasons": [f"{MODEL_CHECK}: {r}" for r in check["reasons"]]}
    return AuditOutcome(report, outcome.images)


def part_seconds(report: dict) -> dict[str, float]:
    """What each part of one scale's audit took: every probe family's renders, and the model-side check."""
    seconds = {name: f["seconds"] for name, f in report.get("families", {}).items()}
    return seconds | ({MODEL_CHECK: report["model_check"]["seconds"]} if report.get("model_check") else {})


def strictest_scale(outcomes: list[tuple[float, AuditOutcome]]) -> AuditOutcome:
    """Audits of one LoRA at several scales as one: the report and images of the scale whose verdict is
    strictest (the lowest such scale), its reasons naming that scale, and under ``lora_scales`` every
    scale's verdict and figures."""
    scale, chosen = _strictest(outcomes, float)
    report = dict(chosen.report)
    if len(outcomes) > 1:
        verdict = report["verdict"]
        report["verdict"] = {**verdict, "reasons": [f"at LoRA scale {scale:g}: {r}" for r in verdict["reasons"]]}
        report["lora_scales"] = [{"scale": s, "verdict": o.report["verdict"], "metrics": o.report["metrics"],
                                  "images": len(o.report["samples"]), "seconds": o.report["seconds"],
                                  "family_seconds": part_seconds(o.report)} for s, o in outcomes]
        report["seconds"] = round(sum(o.report["seconds"] for _, o in outcomes), 2)
    return AuditOutcome(report, chosen.images)


def save_outcome(outcome: AuditOutcome, out: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and the reviewer page ``report.html`` (flagged images redacted)."""
    from .report import write_html

    return write_report(outcome.report, out), write_html(outcome.report, out, outcome.images or None)


def report_sha256(report: dict) -> str:
    return hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()


def write_report(report: dict, out: str | Path) -> Path:
    """Write ``report.json`` atomically into ``out``."""
    return atomic_write(Path(out) / "report.json", json.dumps(report, indent=1))
