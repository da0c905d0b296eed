"""Handing committed work to the queues, failing it closed when the broker cannot take it.

A job or hardening run is committed ``queued`` before its message is sent, so a worker always finds the
row. If the send fails (the broker is down), no worker will ever hear of the row: it must not sit
``queued`` forever. It is marked ``failed`` at once and the request answered 503 ``queue_unavailable``;
the client submits it again.

A new job is sent only if its tenant has a free dispatch slot (``gate.pipeline.fairness``); otherwise it is held,
answered 201 ``queued`` like any other (its ``stage`` says it waits for a slot), and sent by the fair dispatcher
later: the broker is not asked, so a held job never fails for the broker's sake.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session

from gate.pipeline.fairness import admit, dispatch_waiting
from gate.storage.audit_log import SYSTEM, StaleState, transition
from gate.storage.models import AlignmentRun, Job, utcnow

from .errors import ApiError

log = logging.getLogger(__name__)


def hand_to_queues(session: Session, row: Job | AlignmentRun, send: Callable[[], None], field: str) -> None:
    """``send()`` the row's message; on failure fail the row and raise a 503 naming it under ``field``.
    Returns quietly if a worker took the row after all (the failure was only in the acknowledgement)."""
    try:
        send()
    except Exception as exc:  # whatever the broker raised, no worker will ever hear of this row
        log.exception("%s %s could not be handed to the queues", row.__tablename__, row.id)
        error = f"could not be queued ({type(exc).__name__}); submit it again"
        try:
            transition(session, row, "failed", SYSTEM, reason=error, changes={"error": error, "finished_at": utcnow()})
            session.commit()
        except StaleState:  # the message got through after all: a worker has the row already
            session.rollback()
            return
        raise ApiError(503, "queue_unavailable", f"{field} {row.id} {error}", **{field: row.id}) from None


def hand_job_to_queues(session: Session, job: Job, send: Callable[[str], None], share: int) -> None:
    """``send(job.id)``, as ``hand_to_queues`` does, if its tenant has fewer than ``share`` jobs sent and not
    started and none held; else leave it held for the fair dispatcher, and run it for the tenant at once: a
    dispatcher that counted this job while it was undecided may have left a slot free."""
    if admit(session, job, share):
        hand_to_queues(session, job, lambda: send(job.id), "job")
        return
    dispatch_waiting(session, send, share, tenants=[job.tenant_id])
    session.refresh(job)
