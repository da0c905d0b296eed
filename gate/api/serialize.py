"""Rows as JSON: one function per resource, so every route returns the same shape for it."""

from __future__ import annotations

from datetime import datetime

from gate.storage.models import AlignmentRun, BaseModel, Dataset, Job, Review, Verdict

from .redaction import customer_error, customer_reason


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def dataset_json(row: Dataset) -> dict:
    return {"id": row.id, "tenant": row.tenant_id, "name": row.name, "status": row.status,
            "content_sha256": row.content_sha256, "size_bytes": row.size_bytes, "image_count": row.image_count,
            "contamination_ratio": row.contamination_ratio, "created_at": _time(row.created_at)}


def job_json(row: Job, staff: bool = False) -> dict:
    """A job; its ``error`` verbatim for ``staff``, as ``customer_error`` puts it for everyone else."""
    return {"id": row.id, "tenant": row.tenant_id, "base_model": row.base_model_id, "dataset": row.dataset_id,
            "method": row.method, "hyperparameters": row.hyperparameters, "status": row.status, "stage": row.stage,
            "progress": row.progress, "attempts": row.attempts, "idempotency_key": row.idempotency_key,
            "webhook_url": row.webhook_url,
            "error": row.error if staff else customer_error(row.error), "created_at": _time(row.created_at),
            "updated_at": _time(row.updated_at), "finished_at": _time(row.finished_at)}


def base_model_json(row: BaseModel, staff: bool = True) -> dict:
    """Customers see what identifies a base model; where it lives on the gate's disks, and how it is loaded
    from there, is for staff."""
    body = {"id": row.id, "name": row.name, "weights_sha256": row.weights_sha256,
            "baseline_ready": row.baseline_report_path is not None, "created_at": _time(row.created_at)}
    if staff:
        body |= {"path": row.path, "config": row.config_path, "variant": row.variant, "vae": row.vae_path,
                 "audit_profile": row.audit_profile}
    return body


def verdict_json(row: Verdict | None, staff: bool) -> dict | None:
    """A verdict; a customer reads an incomplete audit's reason without its detail (``gate.api.redaction``)."""
    if row is None:
        return None
    reasons = row.reasons if staff else [customer_reason(r) for r in row.reasons]
    return {"decision": row.decision, "reasons": reasons, "policy": f"{row.policy_name} v{row.policy_version}",
            "created_at": _time(row.created_at)}


def review_json(row: Review | None) -> dict | None:
    if row is None:
        return None
    return {"decision": row.decision, "reason": row.reason, "reviewer": row.reviewer_key_id,
            "created_at": _time(row.created_at)}


def alignment_json(row: AlignmentRun) -> dict:
    return {"id": row.id, "name": row.name, "status": row.status, "progress": row.progress,
            "output_path": row.output_path, "error": row.error, "config": row.config,
            "created_at": _time(row.created_at), "finished_at": _time(row.finished_at)}
