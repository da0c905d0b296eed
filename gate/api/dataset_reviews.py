"""``/v1/dataset-reviews`` and ``/v1/datasets/<id>/review``: the reviewers' queue of flagged datasets and
their decisions (the rules are ``gate.service.reviews``)."""

from __future__ import annotations

from flask import Blueprint, g, request
from sqlalchemy.orm import Session

from gate.service.pagination import page_request, paginate
from gate.service.reviews import (
    REVIEWER,
    WAITING_DATASETS,
    DatasetReviewRequest,
    dataset_review,
    decide_dataset,
    intake_record,
)
from gate.storage.models import Dataset

from .auth import current_principal, login_required
from .errors import json_body
from .redaction import customer_intake
from .serialize import dataset_json

bp = Blueprint("dataset_reviews", __name__, url_prefix="/v1")
# What a dataset's ``error`` reads as over the API (the exception's text, which can name the gate's paths and
# workers, is in its audit log for operators): a fault of the service, not of the data.
SERVICE_FAULT = ("the gate could not scan this dataset (a fault of the service, not of the data): a failed dataset "
                 "can be uploaded again; a screening is asked for again by the next job on that base model")


def dataset_detail(session: Session, dataset: Dataset, staff: bool) -> dict:
    """A dataset with its intake figures and its review: what a reviewer decides on, and a customer waits for.
    ``refusal`` says why the intake rejected it (reason, message, files); ``error`` what kept the service from
    taking it in (``failed``) or from screening it for a base model, if anything. ``staff`` read the intake
    whole; a customer reads it without its detectors (``gate.api.redaction.customer_intake``)."""
    intake = intake_record(session, dataset)
    if not staff:
        intake = customer_intake(intake)
    return dataset_json(dataset) | {"intake": intake, "refusal": (intake or {}).get("refusal"),
                                    "error": SERVICE_FAULT if dataset.error else None,
                                    "review": dataset_review(session, dataset)}


@bp.get("/dataset-reviews")
@login_required(REVIEWER, "operator")
def queue():
    """Flagged datasets waiting for a decision, oldest first (every tenant's), a page at a time."""
    page = paginate(g.db, WAITING_DATASETS, Dataset.created_at, Dataset.id, *page_request(request.args))
    return {"datasets": [dataset_detail(g.db, row, staff=True) for row in page.rows],
            "next_cursor": page.next_cursor}


@bp.post("/datasets/<dataset_id>/review")
@login_required(REVIEWER)
def decide(dataset_id: str):
    return dataset_detail(g.db, decide_dataset(g.db, current_principal(), dataset_id,
                                               json_body(DatasetReviewRequest)), staff=True)
