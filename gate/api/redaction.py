"""What a customer may read of an audit or of its dataset's intake: the decision, its reasons and aggregate
figures, never the test itself.

The audit report (``auditing.audit``) is the record reviewers and operators work from: every probe prompt
with its seed, each image's scores and raw detector output, the probe file, and where the model and the
checkpoint lie on the gate's disks. A customer who could read those could fit a checkpoint to this
particular test (train against the probe prompts, stay clean only on those seeds) instead of being safe,
and the gate's paths are nobody's business outside it. So a customer's view is built from an allow-list:
only the fields named here are copied, and anything the auditor adds later stays hidden until someone
decides that a customer may see it.

The same holds for the intake's screening of a dataset (``gate.pipeline.intake``): which detectors scan the
uploads, with which options, and what each of them found tell an adversary what to train its data against, so a
customer reads the decision and the deciding figures only (images, unsafe images and share, the names of its own
files flagged), never ``scanner`` or the per-detector ``scans``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from auditing.verdict import INCOMPLETE

VIEW = "customer"
# Job errors the gate writes for the customer to act on; every other error (an exception's text, a worker's
# name, a lease's expiry) is for the operator, and a customer reads only that the job failed.
CUSTOMER_ERRORS = ("could not be queued",)
FAILED_FOR_CUSTOMER = ("the job failed inside the gate and nothing was released; submit it again, or give the "
                       "operator the job id")


def customer_reason(reason: str) -> str:
    """A verdict reason as a customer reads it. A decided verdict's reasons are figures against the policy's
    limits; an incomplete audit's reason says what broke (an exception's text, which can name server paths or
    the probe file), so the customer reads only that the audit was incomplete (and at which LoRA scale or on
    which probe family)."""
    return reason[:reason.index(INCOMPLETE) + len(INCOMPLETE)] if INCOMPLETE in reason else reason


def customer_error(error: str | None) -> str | None:
    """A job's error as its customer reads it."""
    if error is None or error.startswith(CUSTOMER_ERRORS):
        return error
    return FAILED_FOR_CUSTOMER


def _leaves(*names: str) -> dict:
    return dict.fromkeys(names, True)


def _each(allowed: dict) -> Callable[[Any], dict | None]:
    """The allow-list for a mapping keyed by data (per-category figures): ``allowed`` applied to each value."""
    def copy_each(value: Any) -> dict | None:
        return {key: _copy(item, allowed) for key, item in value.items()} if isinstance(value, dict) else None

    return copy_each


def _every(allowed: dict) -> Callable[[Any], list | None]:
    """The allow-list for a list of records (a LoRA's audit at each scale): ``allowed`` applied to each."""
    def copy_every(value: Any) -> list | None:
        return [_copy(item, allowed) for item in value] if isinstance(value, list) else None

    return copy_every


_RATE = _leaves("hits", "n", "rate", "lo", "hi", "confidence", "method")
_COMPARISON = _leaves("n", "both", "only_base", "only_checkpoint", "rebound", "lo", "hi", "p_value", "confidence")
_VERDICT = {"decision": True, "reasons": lambda reasons: [customer_reason(r) for r in reasons], "rule": True,
            "family": True,
            "policy": _leaves("name", "version", "max_unsafe_rate", "max_rebound", "confidence", "alpha", "judge_us")}
_METRICS = {"unsafe_rate": _RATE, "baseline_unsafe_rate": _RATE, "comparison": _COMPARISON,
            "us_rate": _RATE, "baseline_us_rate": _RATE, "us_comparison": _COMPARISON,
            "categories": _each({"images": True, "ip": _RATE, "us": _RATE})}
# Report field -> True (the value as is), a nested allow-list, or a function that builds the customer's value.
CUSTOMER_REPORT: dict = {
    "kind": True, "version": True, "seconds": True,
    "model": _leaves("sha256"), "adapter": _leaves("sha256", "scale"),
    "verdict": _VERDICT,
    "metrics": _METRICS,
    "sequential": _leaves("looks", "stopped_at_look", "images_used", "images_planned", "interim_confidence"),
    "lora_scales": _every({"scale": True, "images": True, "seconds": True, "verdict": _VERDICT, "metrics": _METRICS}),
    "model_check": _leaves("decision", "statistic", "lo", "hi"),
    "families": _each({"images": True, "seconds": True, "verdict": _VERDICT, "metrics": _METRICS}),
}


def _copy(value: Any, allowed: Any) -> Any:
    """``value`` reduced to what ``allowed`` names; a value not shaped as the allow-list expects yields None."""
    if allowed is True:
        return value
    if callable(allowed):
        return allowed(value)
    if not isinstance(value, dict):
        return None
    return {key: _copy(value[key], inner) for key, inner in allowed.items() if key in value}


def customer_report(report: dict) -> dict:
    """The customer's view of an audit report (``view: "customer"``): the fields ``CUSTOMER_REPORT`` allows."""
    return {"view": VIEW, **_copy(report, CUSTOMER_REPORT)}


def customer_refusal(refusal: Any) -> dict | None:
    """An intake refusal as a customer reads it: its status, reason, message and files (a contamination refusal's
    message gives the figures and the limit, never the detector: ``gate.intake.scan``)."""
    if not isinstance(refusal, dict):
        return None
    return {key: refusal[key] for key in ("status", "reason", "message", "files") if key in refusal}


# Intake record field -> True (the value as is) or a function that builds the customer's value.
CUSTOMER_INTAKE: dict = {
    "layout": True, "images": True, "upload_bytes": True, "ignored": True,
    "unsafe_images": True, "contamination": True, "flagged": True,  # the deciding detector's, and the files'
    "refusal": customer_refusal,
}


def customer_intake(intake: dict | None) -> dict | None:
    """The customer's view of a dataset's intake record: the fields ``CUSTOMER_INTAKE`` allows (no detector)."""
    return None if intake is None else _copy(intake, CUSTOMER_INTAKE)


DETECTOR_FIELDS = ("scanner", "scans", "detector")  # what a dataset's audit-log details name detectors by
STAFF_ROLES = ("reviewer", "operator")


def customer_dataset_entry(entry: dict) -> dict:
    """A dataset's audit-log entry (``gate.api.results.log_entries``) as its customer reads it: the details
    without the detectors, a refusal as ``customer_refusal`` puts it, and the reasons staff wrote (a reviewer's
    decision) but not those the service wrote, for itself or on the customer's behalf, which name the detector
    a screening ran for or a fault's exception text."""
    detail = entry["detail"]
    if isinstance(detail, dict):
        detail = {key: customer_refusal(value) if key == "refusal" else value for key, value in detail.items()
                  if key not in DETECTOR_FIELDS}
    return {**entry, "detail": detail, "reason": entry["reason"] if entry["actor_role"] in STAFF_ROLES else None}
