"""Reviewers' queue and decisions for flagged datasets: a dataset the intake flagged (images its scanner called
unsafe, but no more than the reject ratio) trains nothing until a reviewer accepts it, with a reason; a
rejected one never trains. There is no review table for datasets: the decision, who took it and why are
the dataset's audit-log entry, written by ``transition`` in the same transaction as its move, so the
append-only log is the record of every dataset review.

``decide_dataset`` is the one place these rules live: the API below and the reviewer pages (``gate.web``)
both call it. As for jobs, a reviewer may not clear its own tenant's data.
"""

from __future__ import annotations

from collections.abc import Mapping

from flask import Blueprint, g
from sqlalchemy import select
from sqlalchemy.orm import Session

from gate.auth import Principal, require_role
from gate.storage.models import AuditLogEntry, Dataset

from .auth import current_principal, login_required
from .errors import ApiError, json_object
from .reviews import REVIEWER, commit_decision, review_input
from .serialize import dataset_json

bp = Blueprint("dataset_reviews", __name__, url_prefix="/v1")
WAITING = "flagged"
DATASET_OUTCOME = {"accept": "accepted", "reject": "rejected"}
DATASET_DECISIONS = tuple(DATASET_OUTCOME)
# The queue: every tenant's flagged datasets, longest-waiting first (the API's and the reviewer pages').
WAITING_DATASETS = select(Dataset).where(Dataset.status == WAITING).order_by(Dataset.created_at, Dataset.id)


def _log_entry(session: Session, dataset: Dataset, *conditions) -> AuditLogEntry | None:
    """The dataset's latest audit-log entry that meets ``conditions``."""
    return session.scalars(select(AuditLogEntry).where(AuditLogEntry.entity_type == Dataset.__tablename__,
                                                       AuditLogEntry.entity_id == dataset.id, *conditions)
                           .order_by(AuditLogEntry.id.desc())).first()


def intake_record(session: Session, dataset: Dataset) -> dict | None:
    """What the intake recorded when the dataset arrived: images, unsafe images, flagged files, the scanner."""
    entry = _log_entry(session, dataset, AuditLogEntry.action == "created")
    return entry.detail if entry is not None else None


def dataset_review(session: Session, dataset: Dataset) -> dict | None:
    """The reviewer's decision on the dataset (who, when, why), as its audit-log entry holds it."""
    entry = _log_entry(session, dataset, AuditLogEntry.action == "status", AuditLogEntry.actor_role == REVIEWER)
    if entry is None:
        return None
    return {"decision": entry.detail["review"], "reason": entry.reason, "reviewer": entry.actor_key_id,
            "created_at": entry.at.isoformat()}


def dataset_detail(session: Session, dataset: Dataset) -> dict:
    """A dataset with its intake figures and its review: what a reviewer decides on, and a customer waits for."""
    return dataset_json(dataset) | {"intake": intake_record(session, dataset),
                                    "review": dataset_review(session, dataset)}


def dataset_refusal(principal: Principal, dataset: Dataset) -> ApiError | None:
    """Why ``principal`` (a reviewer) may not decide on ``dataset`` now, or None if it may."""
    if dataset.status != WAITING:
        return ApiError(409, "not_in_review", f"dataset {dataset.id} is {dataset.status}; only {WAITING} datasets "
                                              "take a decision")
    if principal.tenant_id == dataset.tenant_id:  # nobody clears their own tenant's training data
        return ApiError(403, "forbidden", "a reviewer may not decide on a dataset of its own tenant")
    return None


def decide_dataset(session: Session, principal: Principal, dataset_id: str, body: Mapping) -> Dataset:
    """Accept or reject the flagged dataset ``dataset_id`` with ``body``'s ``decision`` and (required)
    ``reason``; commits.

    Raises ``gate.auth.Forbidden`` for a caller who is not a reviewer, ``ApiError`` for a bad decision or
    reason (400), a missing dataset (404), a dataset not flagged or decided concurrently (409), or a dataset
    of the reviewer's own tenant (403)."""
    require_role(principal, REVIEWER)
    decision, reason = review_input(body, DATASET_DECISIONS)
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise ApiError(404, "not_found", f"no dataset {dataset_id!r}")
    if (refused := dataset_refusal(principal, dataset)) is not None:
        raise refused
    commit_decision(session, dataset, DATASET_OUTCOME[decision], principal, decision, reason)
    return dataset


@bp.get("/dataset-reviews")
@login_required(REVIEWER, "operator")
def queue():
    """Flagged datasets waiting for a decision, oldest first (every tenant's)."""
    return {"datasets": [dataset_detail(g.db, row) for row in g.db.scalars(WAITING_DATASETS).all()]}


@bp.post("/datasets/<dataset_id>/review")
@login_required(REVIEWER)
def decide(dataset_id: str):
    return dataset_detail(g.db, decide_dataset(g.db, current_principal(), dataset_id,
                                               json_object("{decision, reason}")))
