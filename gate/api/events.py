"""``/v1/jobs/<id>/events``: what a customer follows of a running job (``gate.pipeline.events`` writes them).

Polled with ``after=<seq>``: the answer's ``next`` is the number to send next time, so a client sees every
event once, in order. A sample grid comes as the route that serves it, tenant-scoped like its job; its
image is served only once the job is ``released`` (or to staff): a checkpoint the gate withholds shows
none of its output, in a grid or otherwise.
"""

from __future__ import annotations

from typing import Annotated

from flask import Blueprint, g, request, send_file
from pydantic import Field
from sqlalchemy import select

from auditing.config import record
from gate.auth import get_for_principal
from gate.pipeline import events
from gate.service.errors import parse_query
from gate.storage.models import Job, JobEvent

from . import gate
from .auth import current_principal, login_required
from .errors import ApiError

bp = Blueprint("events", __name__, url_prefix="/v1/jobs")

PAGE_MAX = 500  # events in one answer; ``next`` continues


@record
class EventsQuery:
    """``GET /v1/jobs/{job_id}/events``' query."""

    after: Annotated[int, Field(ge=0)] = Field(default=0, description="the seq of the last event seen (the "
                                                                      "answer's next): only later ones come")


@bp.get("/<job_id>/events")
@login_required()
def list_events(job_id: str):
    """200 ``{"events": [...], "next": seq}``: the job's events after ``after``, oldest first, at most
    ``PAGE_MAX``; ``next`` is the last one's number (``after`` itself when there is none yet)."""
    job = get_for_principal(g.db, Job, job_id, current_principal())
    after = parse_query(EventsQuery, request.args).after
    rows = events.after(g.db, job.id, after, PAGE_MAX)
    return {"events": [events.as_json(row) for row in rows], "next": rows[-1].seq if rows else after}


@bp.get("/<job_id>/events/<seq>/image")
@login_required()
def event_image(job_id: str, seq: str):
    """The PNG an event shows: for a customer only once the job is released (403 ``sample_withheld`` before)."""
    principal = current_principal()
    job = get_for_principal(g.db, Job, job_id, principal)
    row = None if not seq.isdigit() else g.db.scalars(
        select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.seq == int(seq))).one_or_none()
    if row is None or row.artifact_key is None:
        raise ApiError(404, "not_found", f"job {job.id} has no event {seq} with an image")
    if not principal.cross_tenant and job.status != "released":
        raise ApiError(403, "sample_withheld", f"job {job.id} is {job.status}: its samples are shown once it is "
                                               "released", state=job.status)
    return send_file(gate().store.path(job.tenant_id, row.artifact_key), mimetype="image/png")
