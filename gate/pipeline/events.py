"""A job's events: what its customer follows while it runs (``GET /v1/jobs/<id>/events``).

Stage changes, the training loss at each progress report, sample grids, checkpoints and the verdict, each a
``JobEvent`` row numbered 1, 2, ... per job. A number is the job's highest plus one; two writers that race
for it collide on the unique ``(job_id, seq)`` and the loser takes the next, so a reader that asks for the
events after ``seq`` never skips one that commits later. ``data`` is what the customer may read: the
verdict's reasons go through ``customer_reason`` before they are written, never the audit's internals.

A stage or verdict event of a job with a webhook target (its own ``webhook_url`` or its tenant's default) is
also owed to that webhook: the ``WebhookOutbox`` row that says so commits with the event, whoever writes it
(a worker's stage, the API's cancel, a reviewer's decision), and ``gate.pipeline.webhooks`` delivers it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gate.storage.models import EVENT_KINDS, Job, JobEvent, WebhookOutbox, WebhookSecret

ATTEMPTS = 5  # writers racing for one job's next number; more than a handful means something else is wrong
ANNOUNCED = ("stage", "verdict")  # posted to webhooks; losses, samples and checkpoints are for polling


def _has_webhook(session: Session, job_id: str) -> bool:
    """Whether the job's events go to a webhook: its own URL or its tenant's default."""
    own, default = session.execute(select(Job.webhook_url, WebhookSecret.url).outerjoin(
        WebhookSecret, WebhookSecret.tenant_id == Job.tenant_id).where(Job.id == job_id)).one()
    return own is not None or default is not None


def append(session: Session, tenant_id: str, job_id: str, kind: str, data: dict[str, Any],
           artifact_key: str | None = None) -> int:
    """Write and commit one event, with the webhook delivery it owes (commit the state change it reports
    first); returns its ``seq``. ``artifact_key``: a file in the tenant's store that the event shows (a sample
    grid)."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"event kind {kind!r} is not one of {EVENT_KINDS}")
    owed = kind in ANNOUNCED and _has_webhook(session, job_id)
    for _ in range(ATTEMPTS):
        seq = (session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id)) or 0) + 1
        session.add(JobEvent(tenant_id=tenant_id, job_id=job_id, seq=seq, kind=kind, data=data,
                             artifact_key=artifact_key))
        if owed:
            session.add(WebhookOutbox(tenant_id=tenant_id, job_id=job_id, event_seq=seq))
        try:
            session.commit()
            return seq
        except IntegrityError:
            session.rollback()
    raise RuntimeError(f"job {job_id}: no event number after {ATTEMPTS} tries")


def stage(session: Session, tenant_id: str, job_id: str, status: str, **data) -> int:
    """The job reached ``status`` (``data``: e.g. the reason a cancel gives)."""
    return append(session, tenant_id, job_id, "stage", {"status": status, **data})


def as_json(row: JobEvent) -> dict:
    """An event as the customer reads it (the API and webhooks): a sample's file as the route that serves it."""
    data = dict(row.data)
    if row.artifact_key is not None:
        data["url"] = f"/v1/jobs/{row.job_id}/events/{row.seq}/image"
    return {"seq": row.seq, "at": row.at.isoformat(), "kind": row.kind, "data": data}


def after(session: Session, job_id: str, seq: int, limit: int) -> list[JobEvent]:
    """The job's events numbered above ``seq``, oldest first, at most ``limit``."""
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > seq)
                                .order_by(JobEvent.seq).limit(limit)))
