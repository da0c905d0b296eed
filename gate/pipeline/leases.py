"""Leases: which worker holds a job (or a hardening run) right now, and until when.

Celery's ``acks_late`` redelivers a message whose worker vanished, but only after the broker's
visibility timeout, which must exceed the longest task (hours of training). Leases recover much faster
and do not depend on the broker: a worker that claims a job writes ``worker`` and ``lease_expires_at``;
a heartbeat thread renews the lease every third of its length; every write a stage makes is
conditional on still holding it. A worker killed with ``kill -9`` stops renewing, its lease expires,
and ``reap`` (run by every worker's reaper process) puts the job back on the queue. Whatever the dead
worker left half-done is redone from the job's last committed state; nothing it wrote after losing the
lease can commit. Lease expiries are times on the database's clock (``gate.storage.clock``), so a worker
and a reaper whose own clocks disagree still agree on whether a lease is live.

A message can also go missing with no lease to expire: the broker loses it, or the process that owed it dies
(or finds the broker down) between committing the state that calls for it and sending it. Every such state
change records ``dispatched_at`` in its own transaction, so ``reconcile`` (the reaper's other half) can send
again what nobody started within ``dispatch_grace_seconds``: a transactional outbox whose outbox is the job's
row. Duplicates are harmless: each stage starts by taking its job by compare-and-set (``take``). A job held for
fair dispatch across tenants has no dispatch recorded (``gate.pipeline.fairness``): the reconciler leaves it to
the fair dispatcher, and ``reap`` hands a training job back held.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from gate.settings import Settings
from gate.storage.audit_log import SYSTEM, StaleState, record, transition
from gate.storage.clock import db_time
from gate.storage.models import AlignmentRun, Job, utcnow

from .fairness import HELD_STAGE, dispatch_waiting, send_each

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """Another worker holds the job now (this one was presumed dead); stop without writing anything."""


def expiry(lease_seconds: int) -> db_time:
    """A lease's end, ``lease_seconds`` from now on the database's clock (a value for an UPDATE)."""
    return db_time(lease_seconds)


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


def reap(sessions: sessionmaker[Session], requeue: Callable[[str, str, str], None], max_attempts: int,
         share: int = Settings.tenant_dispatch_share) -> int:
    """Hand every expired lease back: training jobs and hardening runs return to ``queued``, audits lose
    their lease (and count one more attempt); then ``requeue(kind, id, stage)`` dispatches them again (kind
    "job" from stage "audit", or "alignment"; a job back in ``queued`` waits for a dispatch slot of its tenant,
    ``gate.pipeline.fairness``, and is sent from stage "train" once it has one). A job or run lost in its
    ``max_attempts``-th attempt is failed instead, naming the attempts and the last loss. Returns how many were
    handed back or failed."""
    again: list[tuple[str, str, str]] = []
    requeued: set[str] = set()  # tenants with a job handed back to the train queue
    given_up = handed_back = 0
    with sessions() as session:
        expired = select(Job).where(Job.status.in_(("training", "auditing")), Job.lease_expires_at < db_time())
        for job in session.scalars(expired).all():
            reason = f"lease of worker {job.worker} expired at {job.lease_expires_at.isoformat()}"
            unchanged = Job.lease_expires_at == job.lease_expires_at  # not renewed, not reaped by another reaper
            stage, attempts = ("train" if job.status == "training" else "audit"), job.attempts
            try:
                if attempts >= max_attempts:
                    reason = f"gave up after {attempts} attempts (max_attempts {max_attempts}); the last: {reason}"
                    transition(session, job, "failed", SYSTEM, reason=reason, where=unchanged,
                               changes={"worker": None, "lease_expires_at": None, "error": reason,
                                        "finished_at": utcnow()})
                elif stage == "train":  # held, for fair dispatch below
                    transition(session, job, "queued", SYSTEM, reason=reason, where=unchanged,
                               changes={"worker": None, "lease_expires_at": None, "stage": HELD_STAGE,
                                        "progress": 0.0, "dispatched_at": None})
                else:
                    result = session.execute(update(Job).where(Job.id == job.id, Job.status == "auditing", unchanged)
                                             .values(worker=None, lease_expires_at=None, attempts=Job.attempts + 1,
                                                     dispatched_at=db_time()))
                    if result.rowcount != 1:
                        raise StaleState(job.id)
                    record(session, SYSTEM, job, "lease expired", reason=reason)
                session.commit()
            except StaleState:
                session.rollback()  # the worker renewed it, or another reaper got there first
                continue
            if attempts >= max_attempts:
                log.error("job %s failed: %s", job.id, reason)
                given_up += 1
            elif stage == "train":
                log.warning("reaped job %s: back in the train queue's line of tenant %s", job.id, job.tenant_id)
                requeued.add(job.tenant_id)
                handed_back += 1
            else:
                again.append(("job", job.id, stage))
        expired_runs = select(AlignmentRun).where(AlignmentRun.status == "running",
                                                  AlignmentRun.lease_expires_at < db_time())
        for run in session.scalars(expired_runs).all():
            reason = f"lease of worker {run.worker} expired"
            try:
                if run.attempts >= max_attempts:
                    reason = f"gave up after {run.attempts} attempts (max_attempts {max_attempts}); the last: {reason}"
                    transition(session, run, "failed", SYSTEM, reason=reason,
                               changes={"worker": None, "lease_expires_at": None, "error": reason,
                                        "finished_at": utcnow()})
                else:
                    transition(session, run, "queued", SYSTEM, reason=reason,
                               changes={"worker": None, "lease_expires_at": None, "dispatched_at": db_time()})
                session.commit()
            except StaleState:
                session.rollback()
                continue
            if run.status == "failed":
                log.error("hardening run %s failed: %s", run.id, reason)
                given_up += 1
            else:
                again.append(("alignment", run.id, "align"))
        if requeued:
            dispatch_waiting(session, lambda job_id: requeue("job", job_id, "train"), share, tenants=requeued)
    for kind, row_id, stage in again:
        log.warning("reaped %s %s: dispatching it again from %s", kind, row_id, stage)
    send_each(requeue, again)
    return len(again) + handed_back + given_up


# What waits for a message, by the stage that message starts: (kind, stage, model, the rows' condition).
_WAITING = (("job", "train", Job, Job.status == "queued"),  # a held job's null dispatched_at never matches
            # trained (or its audit's lease reaped), and no worker has taken the audit since
            ("job", "audit", Job, (Job.status == "auditing") & Job.lease_expires_at.is_(None)),
            ("alignment", "align", AlignmentRun, AlignmentRun.status == "queued"))


def reconcile(sessions: sessionmaker[Session], requeue: Callable[[str, str, str], None], grace_seconds: int) -> int:
    """Dispatch again every job and hardening run that waits for a stage no worker started within
    ``grace_seconds`` of its dispatch; each one's ``dispatched_at`` moves to now in the same compare-and-set,
    so of several reapers one sends it, once per grace period. Returns how many."""
    again: list[tuple[str, str, str]] = []
    with sessions() as session:
        for kind, stage, model, waiting in _WAITING:
            overdue = session.scalars(update(model).where(waiting, model.dispatched_at < db_time(-grace_seconds))
                                      .values(dispatched_at=db_time()).returning(model.id)).all()
            for row_id in overdue:
                record(session, SYSTEM, session.get(model, row_id), "dispatched again",
                       reason=f"no worker started its {stage} stage within {grace_seconds} s of its dispatch",
                       detail={"stage": stage})
                again.append((kind, row_id, stage))
        session.commit()
    for kind, row_id, stage in again:
        log.warning("%s %s waited past its dispatch grace: dispatching it again from %s", kind, row_id, stage)
    send_each(requeue, again)
    return len(again)
