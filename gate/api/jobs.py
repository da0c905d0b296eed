"""``/v1/jobs``: a customer asks for a fine-tuning job, follows it, cancels it; an operator queues a failed one
again. The rules are the service layer's (``gate.service.jobs``): a retried POST with the same
``Idempotency-Key`` (header, or the body's ``idempotency_key``) and the same parameters gets the job it already
created (200, ``Idempotent-Replayed: true``); the same key with other parameters is a 409.
"""

from __future__ import annotations

from flask import Blueprint, g, request
from sqlalchemy import select

from gate.auth import CUSTOMER, get_for_principal, scoped
from gate.pipeline.cancel import request_cancel
from gate.pipeline.fairness import dispatch_waiting
from gate.service.job_requests import KEY_HEADER
from gate.service.jobs import create_job, requeue_job
from gate.service.pagination import page_request, paginate
from gate.storage.models import Job

from . import gate
from .auth import current_principal, login_required
from .serialize import job_json

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
REPLAYED_HEADER = "Idempotent-Replayed"  # Stripe's name: set on the answer to a replay


@bp.post("")
@login_required(CUSTOMER)
def create():
    app = gate()
    job, replayed = create_job(g.db, app.settings, app.dispatcher, current_principal(),
                               request.get_json(silent=True), request.headers.get(KEY_HEADER))
    if replayed:
        return job_json(job), 200, {REPLAYED_HEADER: "true"}
    return job_json(job), 201


@bp.get("/<job_id>")
@login_required()
def get(job_id: str):
    from .results import job_detail

    principal = current_principal()
    return job_detail(get_for_principal(g.db, Job, job_id, principal), principal.cross_tenant)


@bp.post("/<job_id>/cancel")
@login_required(CUSTOMER)
def cancel(job_id: str):
    """202: a queued job is ``cancelled`` now, a training one stops at its next step (``gate.pipeline.cancel``)."""
    principal = current_principal()
    return job_json(request_cancel(g.db, get_for_principal(g.db, Job, job_id, principal), principal)), 202


@bp.post("/<job_id>/requeue")
@login_required("operator")
def requeue(job_id: str):
    """202: a failed job queued again from a clean state, with a reason (``gate.service.jobs.requeue_job``)."""
    app = gate()
    job = requeue_job(g.db, current_principal(), job_id, request.get_json(silent=True), app.settings.jobs_dir)
    dispatch_waiting(g.db, app.dispatcher.job, app.settings.tenant_dispatch_share, tenants=[job.tenant_id])
    g.db.refresh(job)
    return job_json(job, staff=True), 202


@bp.get("")
@login_required()
def list_jobs():
    """The caller's jobs (staff: every tenant's), newest first, a page at a time."""
    principal = current_principal()
    page = paginate(g.db, scoped(select(Job), Job, principal), Job.created_at, Job.id, *page_request(request.args),
                    newest_first=True)
    return {"jobs": [job_json(row, principal.cross_tenant) for row in page.rows], "next_cursor": page.next_cursor}
