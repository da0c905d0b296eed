"""The Celery tasks: thin wrappers that give ``gate.pipeline``'s stages a worker identity and a runtime.

A worker's identity for a lease is ``<hostname>/<task id>``: unique per attempt, and known to the
failure link (``job_failed`` receives the failed task's request), which then fails the job only if that
attempt still held it. A stage that finds its lease lost raises ``Ignore``: the chain stops quietly,
because the job's new holder runs the rest. So does a stage that cannot reach the database: the job is not
at fault, and stays in its last committed state, from which the reaper hands it on (its lease expires, or
its dispatch is overdue).
"""

from __future__ import annotations

import logging
import os

from celery import current_app, shared_task
from celery.exceptions import Ignore
from celery.signals import worker_process_init, worker_process_shutdown
from kombu.exceptions import OperationalError as BrokerUnavailable
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from gate import metrics
from gate.pipeline import audit, intake, train, verdict
from gate.pipeline.fairness import dispatch_waiting
from gate.pipeline.leases import LeaseLost
from gate.pipeline.runtime import Runtime

from .dispatch import CeleryDispatcher

log = logging.getLogger(__name__)

_runtime: dict[int, Runtime] = {}


def runtime() -> Runtime:
    """This process's runtime (opened after the fork: database connections do not survive one)."""
    pid = os.getpid()
    if pid not in _runtime:
        _runtime.clear()
        _runtime[pid] = Runtime.open(current_app.ftgate_settings)
    return _runtime[pid]


def worker_id(request) -> str:
    return f"{request.hostname}/{request.id}"


@worker_process_shutdown.connect
def _job_process_exited(pid: int, **_) -> None:
    """A job process's live gauges (stages in progress) go with it (``gate.metrics``)."""
    metrics.process_exited(pid)


@worker_process_init.connect
def _forget_killed_job_processes(**_) -> None:
    """A job process killed outright never ran its exit hook; the next one to start drops its live gauges."""
    metrics.forget_dead_processes()


def _stage(task, run, job_id: str, *args):
    try:
        return run(runtime(), job_id, *args)
    except LeaseLost as exc:
        log.warning("%s: %s", task.name, exc)
        raise Ignore() from exc
    except OperationalError as exc:
        log.error("%s: the database is unreachable (%s); %s is left to the reaper", task.name, exc.orig, job_id)
        raise Ignore() from exc


def _send_next_of(app):
    """``started(tenant)`` for the train stage: the job taken frees a dispatch slot of its tenant, so the tenant's
    next held job is sent now rather than at the reaper's next pass (``gate.pipeline.fairness``)."""
    dispatcher = CeleryDispatcher(app)

    def started(tenant_id: str) -> None:
        rt = runtime()
        try:
            with rt.sessions() as session:
                dispatch_waiting(session, dispatcher.job, rt.settings.tenant_dispatch_share, tenants=[tenant_id])
        except SQLAlchemyError:  # the job in hand trains regardless; the reaper's next pass sends the held one
            log.exception("could not dispatch the next held job of tenant %s", tenant_id)

    return started


@shared_task(name="gate.train", bind=True)
def train_job(self, job_id: str) -> bool:
    return _stage(self, train.train, job_id, worker_id(self.request), _send_next_of(self.app))


def _audit_and_decide(rt: Runtime, job_id: str, worker: str) -> str | None:
    """The verdict follows its audit in the same task: queued behind other hours-long audits it would wait
    holding a lease nobody renews, and the reaper would take a live job from a worker presumed dead."""
    return verdict.decide(rt, job_id) if audit.audit(rt, job_id, worker) else None


@shared_task(name="gate.audit", bind=True)
def audit_job(self, job_id: str) -> str | None:
    return _stage(self, _audit_and_decide, job_id, worker_id(self.request))


@shared_task(name="gate.job_failed")
def job_failed(request, exc, traceback, job_id: str) -> None:
    """Failure link of every stage: the job ends ``failed`` (fail closed: nothing is released). Not when the
    broker refused the next stage's message, which Celery sends after the stage committed and returned: the
    job is not at fault, and the reaper's reconciler sends the message again."""
    if isinstance(exc, BrokerUnavailable):
        log.error("%s: the next stage's message was refused (%s); job %s is left to the reaper", request.task, exc,
                  job_id)
        return
    verdict.fail(runtime(), job_id, worker_id(request), f"{type(exc).__name__}: {exc}")


@shared_task(name="gate.intake", bind=True)
def intake_dataset(self, dataset_id: str) -> str | None:
    """A fault of the service leaves the dataset for another attempt, after a pause (bounded by
    ``max_attempts``, which the stage counts; were this message lost, the reaper sends it again)."""
    outcome = _stage(self, intake.run, dataset_id, worker_id(self.request))
    if outcome == intake.RETRY:
        raise self.retry(countdown=intake.FAULT_BACKOFF_S, max_retries=None)
    return outcome


@shared_task(name="gate.baseline")
def baseline(base_model_id: str) -> None:
    audit.ensure_baseline(runtime(), base_model_id)


@shared_task(name="gate.align", bind=True)
def align(self, run_id: str) -> None:
    from gate.pipeline.hardening import harden

    _stage(self, harden, run_id, worker_id(self.request))
