"""Reviewers' queue and decisions: a flagged job waits in ``review`` until a reviewer approves (released)
or rejects (withheld) it, with a reason. One review per job; the decision, who took it and why go to the
audit log in the same transaction as the job's move.

``take_decision`` is the one place these rules live: the API below and the reviewer pages (``gate.web``)
both call it, so a form cannot decide what the API would refuse.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from flask import Blueprint, g
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gate.auth import Principal, require_role
from gate.storage.audit_log import StaleState, transition
from gate.storage.models import REVIEW_DECISIONS, Dataset, Job, Review

from .auth import current_principal, login_required
from .errors import ApiError, bounded_text, json_object
from .results import job_detail

log = logging.getLogger(__name__)

bp = Blueprint("reviews", __name__, url_prefix="/v1/reviews")
REVIEWER = "reviewer"
REASON_MAX_CHARS = 2_000
OUTCOME = {"approve": "released", "reject": "withheld"}


def refusal(principal: Principal, job: Job) -> ApiError | None:
    """Why ``principal`` (a reviewer) may not decide on ``job`` now, or None if it may."""
    if job.status != "review":
        return ApiError(409, "not_in_review", f"job {job.id} is {job.status}; only jobs in review take a decision")
    if principal.tenant_id == job.tenant_id:  # nobody clears their own tenant's checkpoint
        return ApiError(403, "forbidden", "a reviewer may not decide on a job of its own tenant")
    return None


def review_input(body: Mapping, decisions: tuple[str, ...]) -> tuple[str, str]:
    """A review request's decision (one of ``decisions``) and its required reason; a 400 naming the field."""
    decision = body.get("decision")
    if decision not in decisions:
        raise ApiError(400, "invalid_request", f"decision must be one of {list(decisions)} (got {decision!r})",
                       field="decision", allowed=list(decisions))
    return decision, bounded_text(body, "reason", REASON_MAX_CHARS).strip()


def commit_decision(session: Session, row: Job | Dataset, to_state: str, principal: Principal, decision: str,
                    reason: str) -> None:
    """Move ``row`` to ``to_state`` with the reviewer's decision and reason in its audit-log entry, and commit;
    a 409 if another reviewer decided first (the row moved on, or the job's one review exists)."""
    try:
        transition(session, row, to_state, principal, reason=reason, detail={"review": decision})
        session.commit()
    except (StaleState, IntegrityError):
        session.rollback()
        raise ApiError(409, "not_in_review", f"{row.__tablename__[:-1]} {row.id} was decided by someone else "
                                             "first") from None
    log.info("%s %s: %s by reviewer %s", row.__tablename__[:-1], row.id, decision, principal.key_id)
    session.refresh(row)


def take_decision(session: Session, principal: Principal, job_id: str, body: Mapping) -> Job:
    """Approve or reject the job ``job_id`` with ``body``'s ``decision`` and (required) ``reason``; commits.

    Raises ``gate.auth.Forbidden`` for a caller who is not a reviewer, ``ApiError`` for a bad decision or
    reason (400), a missing job (404), a job not in review or decided concurrently (409), or a job of the
    reviewer's own tenant (403)."""
    require_role(principal, REVIEWER)
    decision, reason = review_input(body, REVIEW_DECISIONS)
    job = session.get(Job, job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    if (refused := refusal(principal, job)) is not None:
        raise refused
    session.add(Review(tenant_id=job.tenant_id, job_id=job.id, reviewer_key_id=principal.key_id, decision=decision,
                       reason=reason))
    commit_decision(session, job, OUTCOME[decision], principal, decision, reason)
    return job


@bp.get("")
@login_required(REVIEWER, "operator")
def queue():
    """Jobs waiting for a decision, oldest first (every tenant's)."""
    rows = g.db.scalars(select(Job).where(Job.status == "review").order_by(Job.updated_at, Job.id)).all()
    return {"jobs": [job_detail(row, staff=True) for row in rows]}


@bp.post("/<job_id>")
@login_required(REVIEWER)
def decide(job_id: str):
    return job_detail(take_decision(g.db, current_principal(), job_id, json_object("{decision, reason}")), staff=True)
