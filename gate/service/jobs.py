"""Operators' actions on jobs. A failed job is queued again from a clean state: an audit belongs to the exact
checkpoint it examined (``audits.artifact_sha256``), so the retrained checkpoint is audited anew, and nothing
of the failed attempt (checkpoint row, resumable training state, scratch files, attempt count) carries over.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from gate.auth import Principal, require_role
from gate.pipeline.fairness import HELD_STAGE
from gate.storage.audit_log import StaleState, transition
from gate.storage.models import Artifact, Job

from .errors import ApiError, bounded_text

log = logging.getLogger(__name__)

OPERATOR = "operator"
REASON_MAX_CHARS = 2_000


def requeue_job(session: Session, principal: Principal, job_id: str, body: dict, jobs_dir: Path) -> Job:
    """Queue the failed job ``job_id`` again with ``body``'s required ``reason``; commits. It is held, as any job
    waiting for a dispatch slot of its tenant: the caller runs the fair dispatcher for the tenant
    (``gate.pipeline.fairness.dispatch_waiting``), which sends it first in its tenant's line if a slot is free;
    else a later slot, or the reaper's next pass, does.

    Raises ``gate.auth.Forbidden`` for a caller who is not an operator, ``ApiError`` for a missing reason (400),
    a missing job (404), or a job that is not ``failed`` (409)."""
    require_role(principal, OPERATOR)
    reason = bounded_text(body, "reason", REASON_MAX_CHARS).strip()
    job = session.get(Job, job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    if job.status != "failed":
        raise ApiError(409, "not_failed", f"job {job.id} is {job.status}; only a failed job is queued again",
                       field="job")
    artifact = session.scalars(select(Artifact).where(Artifact.job_id == job.id)).one_or_none()
    if artifact is not None:  # its file stays until the sweep finds no row naming it
        session.delete(artifact)
    try:
        transition(session, job, "queued", principal, reason=reason,
                   changes={"attempts": 0, "error": None, "finished_at": None, "progress": 0.0,
                            "worker": None, "lease_expires_at": None, "dispatched_at": None, "stage": HELD_STAGE})
        session.commit()
    except StaleState:
        session.rollback()
        raise ApiError(409, "not_failed", f"job {job.id} was queued again by someone else first", field="job") \
            from None
    shutil.rmtree(jobs_dir / job.id, ignore_errors=True)  # resumable state and scratch of the failed attempt
    log.info("job %s queued again by %s: %s", job.id, principal.key_id, reason)
    session.refresh(job)
    return job
