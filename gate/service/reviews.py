"""Reviewers' decisions: a flagged job waits in ``review`` until a reviewer approves (released) or rejects
(withheld) it; a dataset the intake flagged trains nothing until a reviewer accepts it. Each decision needs a
reason; who took it and why go to the audit log in the same transaction as the row's move. Nobody clears
their own tenant's checkpoint or data.

There is no review table for datasets: the dataset's audit-log entry, written by ``transition``, is the
record of its review. The API (``gate.api.reviews``, ``gate.api.dataset_reviews``), the reviewer pages
(``gate.web``) and ``ftgate reviews`` all call these functions, so a form cannot decide what the API would
refuse.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import fields
from typing import Literal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from auditing.config import record, text
from gate.auth import Principal, require_role
from gate.pipeline import events
from gate.storage.audit_log import StaleState, transition
from gate.storage.models import REVIEW_DECISIONS, AuditLogEntry, Dataset, Job, Review

from .errors import ApiError, parse_body

log = logging.getLogger(__name__)

REVIEWER = "reviewer"
REASON_MAX_CHARS = 2_000
OUTCOME = {"approve": "released", "reject": "withheld"}
WAITING = "flagged"
DATASET_OUTCOME = {"accept": "accepted", "reject": "rejected"}
DATASET_DECISIONS = tuple(DATASET_OUTCOME)
# The queues: every tenant's rows waiting for a decision, longest-waiting first.
WAITING_JOBS = select(Job).where(Job.status == "review").order_by(Job.updated_at, Job.id)
WAITING_DATASETS = select(Dataset).where(Dataset.status == WAITING).order_by(Dataset.created_at, Dataset.id)


def refusal(principal: Principal, job: Job) -> ApiError | None:
    """Why ``principal`` (a reviewer) may not decide on ``job`` now, or None if it may."""
    if job.status != "review":
        return ApiError(409, "not_in_review", f"job {job.id} is {job.status}; only jobs in review take a decision")
    if principal.tenant_id == job.tenant_id:  # nobody clears their own tenant's checkpoint
        return ApiError(403, "forbidden", "a reviewer may not decide on a job of its own tenant")
    return None


@record
class ReviewRequest:
    """A reviewer's decision on a flagged job: ``approve`` releases the checkpoint, ``reject`` withholds it."""

    decision: Literal[REVIEW_DECISIONS]
    reason: text(REASON_MAX_CHARS)


@record
class DatasetReviewRequest:
    """A reviewer's decision on a flagged dataset: ``accept`` lets it train, ``reject`` refuses it for good."""

    decision: Literal[DATASET_DECISIONS]
    reason: text(REASON_MAX_CHARS)


def review_input(body: Mapping | ReviewRequest | DatasetReviewRequest, cls) -> tuple[str, str]:
    """A review's decision and its required reason (stripped): ``body`` is the record ``cls``, or a mapping read
    for ``cls``'s fields alone (a reviewer page's form carries its CSRF token too); a 400 naming the field."""
    if not isinstance(body, cls) and isinstance(body, Mapping):
        body = {f.name: body[f.name] for f in fields(cls) if f.name in body}
    review = parse_body(cls, body)
    return review.decision, review.reason.strip()


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


def take_decision(session: Session, principal: Principal, job_id: str, body: Mapping | ReviewRequest) -> Job:
    """Approve or reject the job ``job_id`` with ``body``'s ``decision`` and (required) ``reason`` (a
    ``ReviewRequest``, or a mapping of its fields); commits.

    Raises ``gate.auth.Forbidden`` for a caller who is not a reviewer, ``ApiError`` for a bad decision or
    reason (400), a missing job (404), a job not in review or decided concurrently (409), or a job of the
    reviewer's own tenant (403)."""
    require_role(principal, REVIEWER)
    decision, reason = review_input(body, ReviewRequest)
    job = session.get(Job, job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    if (refused := refusal(principal, job)) is not None:
        raise refused
    session.add(Review(tenant_id=job.tenant_id, job_id=job.id, reviewer_key_id=principal.key_id, decision=decision,
                       reason=reason))
    commit_decision(session, job, OUTCOME[decision], principal, decision, reason)
    events.stage(session, job.tenant_id, job.id, OUTCOME[decision], review=decision)  # the customer follows it
    return job


def _log_entry(session: Session, dataset: Dataset, *conditions) -> AuditLogEntry | None:
    """The dataset's latest audit-log entry that meets ``conditions``."""
    return session.scalars(select(AuditLogEntry).where(AuditLogEntry.entity_type == Dataset.__tablename__,
                                                       AuditLogEntry.entity_id == dataset.id, *conditions)
                           .order_by(AuditLogEntry.id.desc())).first()


def intake_record(session: Session, dataset: Dataset) -> dict | None:
    """What the intake found: images, unsafe images, flagged files, the deciding scanner, the figures per
    detector (``gate.pipeline.intake``); for a dataset taken in before the intake ran on workers, its upload's
    audit-log entry held them."""
    if dataset.intake is not None or dataset.status in ("received", "failed"):
        return dataset.intake
    entry = _log_entry(session, dataset, AuditLogEntry.action == "created")
    return entry.detail if entry is not None else None


def dataset_review(session: Session, dataset: Dataset) -> dict | None:
    """The reviewer's decision on the dataset (who, when, why), as its audit-log entry holds it."""
    entry = _log_entry(session, dataset, AuditLogEntry.action == "status", AuditLogEntry.actor_role == REVIEWER)
    if entry is None:
        return None
    return {"decision": entry.detail["review"], "reason": entry.reason, "reviewer": entry.actor_key_id,
            "created_at": entry.at.isoformat()}


def dataset_refusal(principal: Principal, dataset: Dataset) -> ApiError | None:
    """Why ``principal`` (a reviewer) may not decide on ``dataset`` now, or None if it may."""
    if dataset.status != WAITING:
        return ApiError(409, "not_in_review", f"dataset {dataset.id} is {dataset.status}; only {WAITING} datasets "
                                              "take a decision")
    if principal.tenant_id == dataset.tenant_id:  # nobody clears their own tenant's training data
        return ApiError(403, "forbidden", "a reviewer may not decide on a dataset of its own tenant")
    return None


def decide_dataset(session: Session, principal: Principal, dataset_id: str,
                   body: Mapping | DatasetReviewRequest) -> Dataset:
    """Accept or reject the flagged dataset ``dataset_id`` with ``body``'s ``decision`` and (required)
    ``reason`` (a ``DatasetReviewRequest``, or a mapping of its fields); commits.

    Raises ``gate.auth.Forbidden`` for a caller who is not a reviewer, ``ApiError`` for a bad decision or
    reason (400), a missing dataset (404), a dataset not flagged or decided concurrently (409), or a dataset
    of the reviewer's own tenant (403)."""
    require_role(principal, REVIEWER)
    decision, reason = review_input(body, DatasetReviewRequest)
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise ApiError(404, "not_found", f"no dataset {dataset_id!r}")
    if (refused := dataset_refusal(principal, dataset)) is not None:
        raise refused
    commit_decision(session, dataset, DATASET_OUTCOME[decision], principal, decision, reason)
    return dataset
