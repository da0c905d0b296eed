"""A customer's cancel: a queued job ends ``cancelled`` at once, a training one at its next step.

A training job belongs to the worker holding its lease, so the API does not move it: it sets
``cancel_requested_at``, and the training stage reads it at each progress report (``should_stop``) and
then moves the job to ``cancelled`` itself, as the lease holder, releasing its GPU as the stage unwinds. A job
past training (auditing, or waiting for a reviewer) is no longer the customer's to stop, and a final one has
nothing left to stop: both are refused with the state. A cancelled job has no verdict, so nothing is released.
Either way the ``cancelled`` stage event is owed to the job's webhook like any other (``gate.pipeline.events``
writes it to the outbox): the API posts nothing itself, a reaper delivers it.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gate.service.errors import ApiError
from gate.storage.audit_log import ActorLike, StaleState, record, transition
from gate.storage.models import JOB_TRANSITIONS, Job, utcnow

from . import events

CANCELLED = "cancelled"


class JobCancelled(RuntimeError):
    """The customer cancelled the job this stage runs; the stage stops and records ``cancelled``."""


def request_cancel(session: Session, job: Job, actor: ActorLike) -> Job:
    """Cancel ``job`` for ``actor`` (its tenant's customer): a 409 naming the state when it cannot be."""
    for _ in range(2):  # a worker may take a queued job between the read and the update: then it is training
        if not JOB_TRANSITIONS[job.status]:
            raise ApiError(409, "job_final", f"job {job.id} is {job.status}: it has ended, nothing to cancel",
                           state=job.status)
        if job.status == "queued":
            try:
                transition(session, job, CANCELLED, actor, reason="cancelled by the customer",
                           changes={"cancel_requested_at": utcnow(), "finished_at": utcnow(), "stage": None})
                session.commit()
            except StaleState:
                session.rollback()
                session.refresh(job)
                continue
            events.stage(session, job.tenant_id, job.id, CANCELLED)
        elif job.status == "training":
            asked = session.execute(update(Job).where(Job.id == job.id, Job.cancel_requested_at.is_(None))
                                    .values(cancel_requested_at=utcnow()))
            if asked.rowcount:
                record(session, actor, job, "cancel requested", reason="the worker stops at its next step")
            session.commit()
        else:
            raise ApiError(409, "not_cancellable", f"job {job.id} is {job.status}: only a queued or training job "
                                                   "can be cancelled", state=job.status)
        session.refresh(job)
        return job
    raise ApiError(409, "not_cancellable", f"job {job.id} changed state while being cancelled; try again",
                   state=job.status)


def should_stop(session: Session, job_id: str) -> bool:
    """Whether the customer asked to cancel the job (read by the stage that runs it)."""
    return session.scalar(select(Job.cancel_requested_at).where(Job.id == job_id)) is not None
