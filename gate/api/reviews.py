"""``/v1/reviews``: the reviewers' queue of flagged jobs and their decisions (the rules are
``gate.service.reviews``)."""

from __future__ import annotations

from flask import Blueprint, g, request

from gate.service.pagination import page_request, paginate
from gate.service.reviews import REVIEWER, WAITING_JOBS, ReviewRequest, take_decision
from gate.storage.models import Job

from .auth import current_principal, login_required
from .errors import json_body
from .results import job_detail

bp = Blueprint("reviews", __name__, url_prefix="/v1/reviews")


@bp.get("")
@login_required(REVIEWER, "operator")
def queue():
    """Jobs waiting for a decision, oldest first (every tenant's), a page at a time."""
    page = paginate(g.db, WAITING_JOBS, Job.updated_at, Job.id, *page_request(request.args))
    return {"jobs": [job_detail(row, staff=True) for row in page.rows], "next_cursor": page.next_cursor}


@bp.post("/<job_id>")
@login_required(REVIEWER)
def decide(job_id: str):
    return job_detail(take_decision(g.db, current_principal(), job_id, json_body(ReviewRequest)), staff=True)
