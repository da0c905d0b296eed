"""Per-tenant quotas, checked when a dataset or a job is created, before anything is stored or queued.

Without them one tenant could fill the queues (``max_active_jobs``: jobs queued, training or auditing), the
disk (``max_datasets``, ``max_stored_bytes``: uploads are kept for the jobs and the audit trail, never
deleted), or probe the audit with checkpoint after checkpoint: after ``max_withheld_jobs`` of its jobs were
withheld within ``withheld_window_hours``, its new jobs are refused until the oldest leaves the window (or an
operator raises the limit). Refusals use the API's error shape with ``limit``, ``maximum`` and ``current``.

A dataset that ``failed`` counts toward neither dataset quota: the service could not take it in (a scanner that
could not score, the store away), the customer is told to upload it again, and a fault of ours must not cost them
a place. A ``rejected`` one counts: the refusal is the customer's data, and uploads refused again and again are
someone probing the intake's screening, which the quota is there to bound.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gate.settings import Limits
from gate.storage.models import ACTIVE_JOB_STATES, AuditLogEntry, Dataset, Job, Tenant, utcnow

from .errors import ApiError

UNCOUNTED_DATASETS = ("failed",)  # the service's fault, not the customer's (see the module's docstring)


def _exceeded(status: int, reason: str, field: str, limit: str, maximum: int, current: int, message: str) -> ApiError:
    return ApiError(status, reason, f"{message} (limit {limit}={maximum})", field=field, limit=limit,
                    maximum=maximum, current=current)


def check_dataset_quota(db: Session, tenant_id: str, limits: Limits, upload_bytes: int) -> None:
    """A 429 naming ``file`` if one more dataset of ``upload_bytes`` would exceed the tenant's dataset quotas
    (its datasets but the ``failed`` ones)."""
    count, stored = db.execute(select(func.count(), func.coalesce(func.sum(Dataset.size_bytes), 0))
                               .where(Dataset.tenant_id == tenant_id,
                                      Dataset.status.not_in(UNCOUNTED_DATASETS))).one()
    if count >= limits.max_datasets:
        raise _exceeded(429, "quota_exceeded", "file", "max_datasets", limits.max_datasets, count,
                        f"tenant {tenant_id} has {count} datasets, the most it may keep")
    if stored + upload_bytes > limits.max_stored_bytes:
        raise _exceeded(429, "quota_exceeded", "file", "max_stored_bytes", limits.max_stored_bytes, stored,
                        f"tenant {tenant_id} stores {stored} bytes of datasets; this upload's {upload_bytes} "
                        "would exceed its quota")


def check_job_quota(db: Session, tenant_id: str, limits: Limits) -> None:
    """A 429 if the tenant already has ``max_active_jobs`` unfinished jobs; a 403 ``withheld_budget_exhausted``
    if ``max_withheld_jobs`` of its jobs were withheld within the window. Locks the tenant's row (PostgreSQL)
    until the caller commits, so concurrent requests cannot both take the last place."""
    db.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
    active = db.scalar(select(func.count()).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_JOB_STATES)))
    if active >= limits.max_active_jobs:
        raise _exceeded(429, "quota_exceeded", "tenant", "max_active_jobs", limits.max_active_jobs, active,
                        f"tenant {tenant_id} has {active} jobs queued, training or auditing; submit again once "
                        "one has finished")
    since = utcnow() - timedelta(hours=limits.withheld_window_hours)
    withheld = db.scalar(select(func.count()).where(
        AuditLogEntry.tenant_id == tenant_id, AuditLogEntry.entity_type == Job.__tablename__,
        AuditLogEntry.action == "status", AuditLogEntry.to_state == "withheld", AuditLogEntry.at >= since))
    if withheld >= limits.max_withheld_jobs:
        raise _exceeded(403, "withheld_budget_exhausted", "tenant", "max_withheld_jobs", limits.max_withheld_jobs,
                        withheld, f"{withheld} of tenant {tenant_id}'s jobs were withheld in the last "
                        f"{limits.withheld_window_hours} h (withheld_window_hours): new jobs are refused until the "
                        "oldest leaves the window or an operator raises the budget")
