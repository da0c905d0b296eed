"""Fair dispatch across tenants: at most ``share`` of a tenant's jobs wait in the broker's train queue at once.

Celery's ``train`` queue is one FIFO, so a tenant that submitted 500 jobs would have all 500 ahead of the next
tenant's first. Instead a ``queued`` job is sent only while its tenant has fewer than ``share``
(``tenant_dispatch_share``) jobs *sent and not started*: ``queued`` with ``dispatched_at`` set, the transactional
outbox of ``gate.pipeline.leases``, whose reconciler re-sends any of them a lost message stranded. The tenant's
other queued jobs are *held*: ``queued`` with ``dispatched_at`` null (which the reconciler never touches) and
``stage`` saying why. The broker then holds at most ``share`` jobs per tenant, so a newcomer's job waits behind
at most ``share`` jobs of each other tenant, whatever they submitted.

Whenever a slot may have freed (a job of the tenant starts training; every reaper pass, which also covers
cancelled jobs and lost workers), ``dispatch_waiting`` sends held jobs round-robin across tenants, the tenant
served least recently first (its newest train dispatch among its live jobs; none at all first), the oldest job
first within a tenant (so a job handed back by the reaper, or queued again by an operator, goes before the
tenant's younger ones).

Each decision to send is a compare-and-set on ``dispatched_at`` that counts the tenant's jobs in flight in the same
statement, taken under the tenant's row lock (``SELECT ... FOR NO KEY UPDATE`` on PostgreSQL; SQLite serialises all
writers, and an UPDATE with its subquery is one statement under its write lock). So two dispatchers at once never
exceed the share, and none sends a job twice. A new job enters the outbox before its decision (it is committed with
its dispatch recorded, as before), so a decision under way counts it: the share errs on holding, and the creation
that then holds its job runs the tenant's dispatch itself (``gate.service.queueing``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session, aliased

from gate.storage.audit_log import SYSTEM, record
from gate.storage.clock import db_time
from gate.storage.models import Job, Tenant

log = logging.getLogger(__name__)

HELD_STAGE = "waiting for a dispatch slot of its tenant"  # what a held job's ``stage`` tells its customer


def send_each(send: Callable[..., None], messages: list[tuple[str, ...]]) -> None:
    """``send(*message)`` for each message; one the broker refuses waits for the reconciler (its dispatch is
    recorded on its row)."""
    for message in messages:
        try:
            send(*message)
        except Exception:  # the broker is away: the row's dispatched_at stands, and the reconciler sends it again
            log.exception("could not dispatch %s; the reconciler will send it again", " ".join(message))


def _held(model=Job):
    """The condition of a held job: queued, its dispatch not recorded."""
    return (model.status == "queued") & model.dispatched_at.is_(None)


def in_flight(tenant_id: str, besides: str | None = None):
    """How many of the tenant's jobs (other than ``besides``) are sent to the train queue and not started: a
    scalar subquery, evaluated inside the statement that decides."""
    other = aliased(Job)
    count = select(func.count()).select_from(other).where(other.tenant_id == tenant_id, other.status == "queued",
                                                          other.dispatched_at.is_not(None))
    if besides is not None:
        count = count.where(other.id != besides)
    return count.scalar_subquery()


def _lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialise the tenant's dispatch decisions (PostgreSQL; SQLite ignores FOR UPDATE, its writers are serial).
    ``FOR NO KEY UPDATE``: rows inserted for the tenant meanwhile (a job, an audit-log entry) take the key-share
    lock their foreign key needs without waiting, so a transaction that updates a job and then logs it never
    deadlocks with a decision about that job."""
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))


def admit(session: Session, job: Job, share: int) -> bool:
    """Whether ``job``, just committed ``queued`` with its dispatch recorded, may be sent now: its tenant has fewer
    than ``share`` other jobs in flight and no other job held (those are older in line). Otherwise it is held,
    logged, and committed; False."""
    _lock_tenant(session, job.tenant_id)
    other = aliased(Job)  # not the row being updated
    older_held = exists().where(_held(other), other.tenant_id == job.tenant_id, other.id != job.id)
    held = session.execute(update(Job).where(Job.id == job.id, Job.status == "queued", Job.dispatched_at.is_not(None),
                                             (in_flight(job.tenant_id, besides=job.id) >= share) | older_held)
                           .values(dispatched_at=None, stage=HELD_STAGE)
                           .execution_options(synchronize_session=False)).rowcount == 1
    if held:
        record(session, SYSTEM, job, "held for fair dispatch", detail={"tenant_dispatch_share": share})
    session.commit()
    if held:
        session.refresh(job)
        log.info("job %s held: tenant %s has its %d dispatch slots in use", job.id, job.tenant_id, share)
    return not held


def _take_slot(session: Session, job_id: str, tenant_id: str, share: int) -> bool:
    """Mark the held job dispatched if its tenant has a free slot; committed. False if it has none, or the job
    is no longer held (another dispatcher sent it, its customer cancelled it)."""
    _lock_tenant(session, tenant_id)
    taken = session.execute(update(Job).where(Job.id == job_id, _held(), in_flight(tenant_id) < share)
                            .values(dispatched_at=db_time(), stage=None)
                            .execution_options(synchronize_session=False)).rowcount == 1
    if taken:
        record(session, SYSTEM, session.get(Job, job_id), "dispatched", reason="a dispatch slot of its tenant freed",
               detail={"stage": "train", "tenant_dispatch_share": share})
    session.commit()
    return taken


def _last_served(session: Session, tenants: Iterable[str]) -> dict:
    """Each tenant's newest train dispatch among its jobs waiting for or in training (absent: none)."""
    newest = (select(Job.tenant_id, func.max(Job.dispatched_at))
              .where(Job.tenant_id.in_(list(tenants)), Job.status.in_(("queued", "training")),
                     Job.dispatched_at.is_not(None))
              .group_by(Job.tenant_id))
    return dict(session.execute(newest).all())


def _turn_order(tenants: Iterable[str], served: dict) -> list[str]:
    """Tenants never served first, then the least recently served (ties by id, so every pass agrees)."""
    never = sorted(tenant for tenant in tenants if tenant not in served)
    return never + sorted((t for t in tenants if t in served), key=lambda t: (served[t], t))


def dispatch_waiting(session: Session, send: Callable[[str], None], share: int,
                     tenants: Iterable[str] | None = None) -> int:
    """Send held jobs (of ``tenants``, default all) while their tenants have free slots, round-robin across
    tenants, each by ``send(job_id)`` (its train stage); returns how many were sent. A send the broker refuses is
    left to the reconciler."""
    position = func.row_number().over(partition_by=Job.tenant_id, order_by=(Job.created_at, Job.id)).label("pos")
    held = select(Job.id, Job.tenant_id, position).where(_held())
    if tenants is not None:
        held = held.where(Job.tenant_id.in_(list(tenants)))
    held = held.subquery()
    lines: dict[str, list[str]] = defaultdict(list)
    # No tenant takes more than ``share`` in one pass: the first ``share`` of each line are enough.
    for job_id, tenant_id in session.execute(select(held.c.id, held.c.tenant_id).where(held.c.pos <= share)
                                             .order_by(held.c.pos)):
        lines[tenant_id].append(job_id)
    order = _turn_order(lines, _last_served(session, lines)) if lines else []
    session.rollback()  # end the reads before the locked decisions
    sent = []
    for turn in range(share):
        for tenant in order:
            if turn < len(lines[tenant]) and _take_slot(session, lines[tenant][turn], tenant, share):
                sent.append(lines[tenant][turn])
    for job_id in sent:
        log.info("job %s dispatched: a slot of its tenant freed", job_id)
    send_each(send, [(job_id,) for job_id in sent])
    return len(sent)
