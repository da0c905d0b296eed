"""Leases: which worker holds a job (or a hardening run) right now, and until when.

Celery's ``acks_late`` redelivers a message whose worker vanished, but only after the broker's
visibility timeout, which must exceed the longest task (hours of training). Leases recover much faster
and do not depend on the broker: a worker that claims a job writes ``worker`` and ``lease_expires_at``;
a heartbeat thread renews the lease every third of its length; every write a stage makes is
conditional on still holding it. A worker killed with ``kill -9`` stops renewing, its lease expires,
and ``reap`` (run by every worker's reaper thread) puts the job back on the queue. Whatever the dead
worker left half-done is redone from the job's last committed state; nothing it wrote after losing the
lease can commit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from gate.storage.audit_log import SYSTEM, StaleState, record, transition
from gate.storage.models import AlignmentRun, Job, utcnow

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """Another worker holds the job now (this one was presumed dead); stop without writing anything."""


def expiry(lease_seconds: int):
    return utcnow() + timedelta(seconds=lease_seconds)


def claim(session: Session, row: Job | AlignmentRun, worker: str, lease_seconds: int, *,
          to_state: str | None = None, changes: dict | None = None) -> bool:
    """Take ``row`` for ``worker``: move it to ``to_state``, or, without one, take a free lease in its
    current state. False if another process got there first. The caller commits."""
    values = {"worker": worker, "lease_expires_at": expiry(lease_seconds), **(changes or {})}
    if to_state is not None:
        try:
            transition(session, row, to_state, SYSTEM, detail={"worker": worker}, changes=values)
        except StaleState:
            return False
        return True
    model = type(row)
    result = session.execute(update(model).where(model.id == row.id, model.status == row.status,
                                                 model.lease_expires_at.is_(None)).values(**values))
    if result.rowcount != 1:
        return False
    record(session, SYSTEM, row, "claimed", detail={"worker": worker, "state": row.status})
    return True


def take(session: Session, model, row_id: str, expected: str, worker: str, lease_seconds: int, **claim_args):
    """Start a stage: the row, claimed by ``worker`` and committed, if it is in state ``expected`` and
    nobody else holds it; None when there is nothing for this worker to do."""
    row = session.get(model, row_id)
    if row is None:
        raise LookupError(f"no {model.__tablename__} row {row_id}")
    if row.status != expected:
        log.info("%s %s is %s, not %s: nothing to do", model.__tablename__, row_id, row.status, expected)
        return None
    if not claim(session, row, worker, lease_seconds, **claim_args):
        log.info("%s %s is held by another worker", model.__tablename__, row_id)
        return None
    session.commit()
    return row


def still_held(model, row_id: str, worker: str):
    """The WHERE clause of every write a lease holder makes."""
    return (model.id == row_id) & (model.worker == worker)


def renew(sessions: sessionmaker[Session], model, row_id: str, worker: str, lease_seconds: int) -> bool:
    with sessions() as session:
        result = session.execute(update(model).where(still_held(model, row_id, worker))
                                 .values(lease_expires_at=expiry(lease_seconds)))
        session.commit()
        return result.rowcount == 1


class Heartbeat:
    """Renews a lease in a background thread while a stage runs; ``check()`` raises once it is lost."""

    def __init__(self, sessions: sessionmaker[Session], model, row_id: str, worker: str, lease_seconds: int):
        self._args = (sessions, model, row_id, worker, lease_seconds)
        self._interval = lease_seconds / 3
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{row_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                held = renew(*self._args)
            except Exception:  # a database hiccup: try again next beat; the lease has slack
                log.exception("heartbeat for %s failed", self._args[2])
                continue
            if not held:
                log.warning("lease on %s lost; this worker will stop the stage", self._args[2])
                self.lost.set()
                return

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"lease on {self._args[2]} lost to another worker")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def reap(sessions: sessionmaker[Session], requeue: Callable[[str, str, str], None]) -> int:
    """Hand every expired lease back: training jobs and hardening runs return to ``queued``, audits lose
    their lease; then ``requeue(kind, id, stage)`` dispatches them again (kind "job" from stage "train" or
    "audit", or "alignment"). Returns how many."""
    now = utcnow()
    again: list[tuple[str, str, str]] = []
    with sessions() as session:
        expired = select(Job).where(Job.status.in_(("training", "auditing")), Job.lease_expires_at < now)
        for job in session.scalars(expired).all():
            reason = f"lease of worker {job.worker} expired at {job.lease_expires_at.isoformat()}"
            stage = "train" if job.status == "training" else "audit"
            try:
                if job.status == "training":
                    transition(session, job, "queued", SYSTEM, reason=reason,
                               changes={"worker": None, "lease_expires_at": None, "stage": None, "progress": 0.0})
                else:
                    result = session.execute(update(Job).where(Job.id == job.id, Job.status == "auditing",
                                                               Job.lease_expires_at == job.lease_expires_at)
                                             .values(worker=None, lease_expires_at=None))
                    if result.rowcount != 1:
                        raise StaleState(job.id)
                    record(session, SYSTEM, job, "lease expired", reason=reason)
                session.commit()
            except StaleState:
                session.rollback()  # the worker renewed it, or another reaper got there first
                continue
            again.append(("job", job.id, stage))
        expired_runs = select(AlignmentRun).where(AlignmentRun.status == "running", AlignmentRun.lease_expires_at < now)
        for run in session.scalars(expired_runs).all():
            try:
                transition(session, run, "queued", SYSTEM, reason=f"lease of worker {run.worker} expired",
                           changes={"worker": None, "lease_expires_at": None})
                session.commit()
            except StaleState:
                session.rollback()
                continue
            again.append(("alignment", run.id, "align"))
    for kind, row_id, stage in again:
        log.warning("reaped %s %s: dispatching it again from %s", kind, row_id, stage)
        requeue(kind, row_id, stage)
    return len(again)
