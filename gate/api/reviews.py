"""Reviewers' queue and decisions: a flagged job waits in ``review`` until a reviewer approves (released)
or rejects (withheld) it, with a reason. One review per job; the decision, who took it and why go to the
audit log in the same transaction as the job's move."""

from __future__ import annotations

import logging

from flask import Blueprint, g
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gate.storage.audit_log import StaleState, transition
from gate.storage.models import REVIEW_DECISIONS, Job, Review

from .auth import current_principal, login_required
from .errors import ApiError, bounded_text, json_object
from .results import job_detail

log = logging.getLogger(__name__)

bp = Blueprint("reviews", __name__, url_prefix="/v1/reviews")
REVIEWER = "reviewer"
REASON_MAX_CHARS = 2_000
OUTCOME = {"approve": "released", "reject": "withheld"}


@bp.get("")
@login_required(REVIEWER, "operator")
def queue():
    """Jobs waiting for a decision, oldest first (every tenant's)."""
    rows = g.db.scalars(select(Job).where(Job.status == "review").order_by(Job.updated_at, Job.id)).all()
    return {"jobs": [job_detail(row) for row in rows]}


@bp.post("/<job_id>")
@login_required(REVIEWER)
def decide(job_id: str):
    body = json_object("{decision, reason}")
    decision = body.get("decision")
    if decision not in REVIEW_DECISIONS:
        raise ApiError(400, "invalid_request", f"decision must be one of {list(REVIEW_DECISIONS)} (got {decision!r})",
                       field="decision", allowed=list(REVIEW_DECISIONS))
    reason = bounded_text(body, "reason", REASON_MAX_CHARS)
    job = g.db.get(Job, job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    if job.status != "review":
        raise ApiError(409, "not_in_review", f"job {job_id} is {job.status}; only jobs in review take a decision")
    principal = current_principal()
    if principal.tenant_id == job.tenant_id:  # nobody clears their own tenant's checkpoint
        raise ApiError(403, "forbidden", "a reviewer may not decide on a job of its own tenant")
    g.db.add(Review(tenant_id=job.tenant_id, job_id=job.id, reviewer_key_id=principal.key_id, decision=decision,
                    reason=reason.strip()))
    try:
        transition(g.db, job, OUTCOME[decision], principal, reason=reason.strip(), detail={"review": decision})
        g.db.commit()
    except (StaleState, IntegrityError):
        g.db.rollback()
        raise ApiError(409, "not_in_review", f"job {job_id} was decided by someone else first") from None
    log.info("job %s %sd by reviewer %s", job.id, decision, principal.key_id)
    g.db.refresh(job)
    return job_detail(job)
