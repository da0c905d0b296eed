"""The training stage: claim a queued job, fine-tune its base model on its dataset, store the checkpoint.

The checkpoint's file goes into the tenant's content-addressed store first; its row and the job's move to
``auditing`` then commit together, on condition that this worker still holds the lease, with the audit's
dispatch recorded (``dispatched_at``): Celery sends the audit message only after the task returns, and a
worker killed in between leaves the reaper's reconciler to send it. A worker that
lost its lease (presumed dead, job handed on) commits nothing, and removes the file it stored unless the
job's one artifact row names it. Every attempt keeps its resumable training state in the job's
``training-state/`` folder, so the attempt after a dead worker continues from the last checkpoint step. The
dataset is read from the store (``gate.pipeline.intake.prepared_folder``), so any host can train any job.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from gate import metrics
from gate.storage.audit_log import SYSTEM, IllegalTransition, StaleState, transition
from gate.storage.clock import db_time
from gate.storage.models import TRAINABLE_DATASET, Artifact, Job, utcnow

from . import events, webhooks
from .base_model import load_base
from .cancel import CANCELLED, JobCancelled, should_stop
from .intake import prepared_folder
from .leases import Heartbeat, LeaseLost, still_held, take
from .runtime import Runtime, device

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 2.0
TRAINING_STATE = "training-state"  # at most one progress write per job every this many seconds


class DatasetNotAccepted(RuntimeError):
    """The job's dataset is not accepted (a job queued before flagged datasets had to wait for a reviewer):
    nothing is trained, and the stage's failure link fails the job (fail closed)."""


def _report_progress(rt: Runtime, job_id: str, worker: str, heartbeat: Heartbeat):
    """A ``progress(fraction, stage)`` callback that writes to the job row, throttled, while the lease holds,
    and stops the training (``JobCancelled``) once the customer has cancelled the job."""
    last = [0.0]

    def progress(fraction: float, stage: str) -> None:
        heartbeat.check()
        with rt.sessions() as session:
            if should_stop(session, job_id):
                raise JobCancelled(f"job {job_id} was cancelled by its customer")
        now = time.monotonic()
        if now - last[0] < PROGRESS_EVERY_S and fraction < 1.0:
            return
        last[0] = now
        with rt.sessions() as session:
            session.execute(update(Job).where(still_held(Job, job_id, worker))
                            .values(progress=min(max(fraction, 0.0), 1.0), stage=stage[:64]))
            session.commit()

    return progress


def _record_events(rt: Runtime, tenant_id: str, job_id: str, heartbeat: Heartbeat):
    """A ``notify(kind, data)`` callback (``gate.training.loop.Notify``) that writes the job's events: losses,
    checkpoints, and sample grids stored in the tenant's store (an event shows one by its key)."""
    def notify(kind: str, data: dict) -> None:
        heartbeat.check()
        key = None
        if kind == "sample":
            with open(data["path"], "rb") as grid:
                stored = rt.store.put(tenant_id, grid, suffix=".png")
            data, key = {"step": data["step"], "sha256": stored.sha256}, stored.key
        elif kind == "loss" and not math.isfinite(data["loss"]):
            data = {**data, "loss": None}  # JSON has no NaN; the job's own checks fail it later
        with rt.sessions() as session:
            events.append(session, tenant_id, job_id, kind, data, artifact_key=key)

    return notify


def _discard_unless_referenced(rt: Runtime, tenant_id: str, key: str) -> None:
    with rt.sessions() as session:
        if session.scalars(select(Artifact.id).where(Artifact.path == key)).first() is None:
            rt.store.delete(tenant_id, key)


def _cancel(rt: Runtime, job_id: str, worker: str, state_dir) -> None:
    """The lease holder ends a job its customer cancelled: ``cancelled``, lease released, nothing stored and
    nothing kept to resume."""
    with rt.sessions() as session:
        job = session.get(Job, job_id)
        try:
            transition(session, job, CANCELLED, SYSTEM, reason="cancelled by the customer during training",
                       where=still_held(Job, job_id, worker),
                       changes={"worker": None, "lease_expires_at": None, "stage": None, "finished_at": utcnow()})
            session.commit()
        except (StaleState, IllegalTransition) as exc:
            raise LeaseLost(f"job {job_id} moved on while this worker cancelled it") from exc
        webhooks.announce(rt, job.tenant_id, job_id, "stage", {"status": CANCELLED})
    shutil.rmtree(state_dir, ignore_errors=True)
    log.info("job %s cancelled during training on %s", job_id, worker)


def train(rt: Runtime, job_id: str, worker: str, started: Callable[[str], None] | None = None) -> bool:
    """Run the training stage; False if the job is not (or no longer) this worker's to train, or its customer
    cancelled it (the job is then ``cancelled``; its GPU memory goes with the stage's frames). ``started(tenant)``
    runs once the job is taken: its tenant's dispatch slot is free (``gate.pipeline.fairness``)."""
    from auditing.layouts import load_examples
    from gate.training import train_job

    lease = rt.settings.lease_seconds
    with rt.sessions() as session:
        job = take(session, Job, job_id, "queued", worker, lease, to_state="training",
                   changes={"attempts": Job.attempts + 1, "stage": "loading", "progress": 0.0, "error": None})
        if job is None:
            return False
        if started is not None:
            started(job.tenant_id)
        session.refresh(job)
        if job.dataset.status != TRAINABLE_DATASET:
            raise DatasetNotAccepted(f"dataset {job.dataset_id} is {job.dataset.status}; only an {TRAINABLE_DATASET} "
                                     "dataset is trained")
        tenant, method, hyperparameters = job.tenant_id, job.method, dict(job.hyperparameters)
        base, dataset_id, attempt = job.base_model, job.dataset_id, job.attempts
        prepared = job.dataset.prepared_path
        webhooks.announce(rt, tenant, job_id, "stage", {"status": "training", "attempt": attempt})
    out = rt.settings.jobs_dir / job_id / f"attempt-{attempt}"
    state_dir = rt.settings.jobs_dir / job_id / TRAINING_STATE  # shared by attempts: a retry resumes
    with Heartbeat(rt.sessions, Job, job_id, worker, lease) as heartbeat, metrics.stage("train"):
        progress = _report_progress(rt, job_id, worker, heartbeat)
        notify = _record_events(rt, tenant, job_id, heartbeat)
        examples = load_examples(prepared_folder(rt, tenant, dataset_id, prepared))
        try:
            result = train_job(method, load_base(base, device=device()), examples, hyperparameters, out / "train",
                               progress=progress, state_dir=state_dir, notify=notify)
        except JobCancelled:
            _cancel(rt, job_id, worker, state_dir)
            return False
        heartbeat.check()
        with rt.sessions() as session:  # cancelled after the last progress report: nothing to audit
            if should_stop(session, job_id):
                _cancel(rt, job_id, worker, state_dir)
                return False
        with open(result.weights, "rb") as weights:
            stored = rt.store.put(tenant, weights, suffix=".safetensors")
        try:
            with rt.sessions() as session:
                job = session.get(Job, job_id)
                session.add(Artifact(tenant_id=tenant, job_id=job_id, kind=result.kind, sha256=stored.sha256,
                                     path=stored.key, size_bytes=stored.size_bytes))
                transition(session, job, "auditing", SYSTEM, where=still_held(Job, job_id, worker),
                           detail={"worker": worker, "artifact_sha256": stored.sha256, "kind": result.kind,
                                   "training_seconds": round(result.seconds, 1),
                                   "resumed_from_step": result.resumed_from_step},
                           changes={"worker": None, "lease_expires_at": None, "stage": "waiting for audit",
                                    "progress": 0.0, "dispatched_at": db_time()})
                session.commit()
            webhooks.announce(rt, tenant, job_id, "stage", {"status": "auditing"})
        except (StaleState, IllegalTransition, IntegrityError) as exc:
            _discard_unless_referenced(rt, tenant, stored.key)
            raise LeaseLost(f"job {job_id} moved on while this worker trained it") from exc
    shutil.rmtree(state_dir, ignore_errors=True)  # the artifact is stored: nothing left to resume
    log.info("job %s trained by %s in %.0f s: %s", job_id, worker, result.seconds, stored.key)
    return True
