"""Jobs' life outside the workers: a customer creates one, an operator queues a failed one again.

A job is checked against the platform limits before its row exists, so workers can trust a queued job. The row
and its audit entry are committed before the dispatcher is called: a worker that picks the id up always finds
the row. A retried request with the same idempotency key and the same parameters gets the job it already created
and dispatches nothing; the same key with other parameters is a 409. A job the queues cannot take (the broker is
down) is failed at once with a 503 (``gate.service.queueing``).

A failed job is queued again from a clean state: an audit belongs to the exact checkpoint it examined
(``audits.artifact_sha256``), so the retrained checkpoint is audited anew, and nothing of the failed attempt
(checkpoint row, resumable training state, scratch files, attempt count) carries over.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gate.auth import CUSTOMER, NotFound, Principal, get_for_principal, require_role
from gate.pipeline.fairness import HELD_STAGE
from gate.settings import Settings
from gate.storage.audit_log import StaleState, record, transition
from gate.storage.models import Artifact, BaseModel, Dataset, Job

from .datasets import require_trainable
from .errors import ApiError, parse_body
from .job_requests import (
    JobRequest,
    RequeueRequest,
    check_fits,
    idempotency_key,
    request_sha256,
    validate_hyperparameters,
    webhook_url,
)
from .queueing import hand_job_to_queues
from .quotas import check_job_quota

log = logging.getLogger(__name__)

OPERATOR = "operator"


def _existing(session: Session, principal: Principal, key: str | None) -> Job | None:
    if key is None:
        return None
    return session.scalars(select(Job).where(Job.tenant_id == principal.tenant_id, Job.idempotency_key == key)) \
        .one_or_none()


def _replayed(job: Job, sha256: str, field: str) -> Job:
    """The job a replayed key created, if the parameters are the first request's; a job from before parameters
    were hashed (``request_sha256`` null) cannot be checked and is returned."""
    if job.request_sha256 is not None and job.request_sha256 != sha256:
        raise ApiError(409, "idempotency_conflict", f"{field} {job.idempotency_key!r} was first used for job "
                                                    f"{job.id} with other parameters; use a new key", field=field)
    return job


def create_job(session: Session, settings: Settings, dispatcher, principal: Principal, body,
               key_header: str | None) -> tuple[Job, bool]:
    """The job ``body`` asks for (a ``JobRequest`` or its JSON; ``key_header``: the request's
    ``Idempotency-Key``, if any), committed and handed to the queues (``dispatcher.job``; ``dispatcher.dataset``
    for a screening the dataset still needs); and whether it is a replay of an earlier request (nothing new
    created or dispatched). Raises ``ApiError`` naming the field at fault, ``gate.auth.Forbidden`` for a caller
    who is not a customer."""
    require_role(principal, CUSTOMER)
    request = parse_body(JobRequest, body)
    key, key_field = idempotency_key(request, key_header)
    sha256 = request_sha256(request)
    if (job := _existing(session, principal, key)) is not None:
        return _replayed(job, sha256, key_field), True
    method = request.method
    hyperparameters = validate_hyperparameters(method, request.hyperparameters, settings.limits)
    base_model = session.get(BaseModel, request.base_model)
    if base_model is None:
        raise ApiError(404, "not_found", f"no base model {request.base_model!r}", field="base_model")
    check_fits(method, hyperparameters, base_model, settings.limits)
    try:
        dataset = get_for_principal(session, Dataset, request.dataset, principal)
    except NotFound:
        raise ApiError(404, "not_found", f"no dataset {request.dataset!r}", field="dataset") from None
    require_trainable(session, principal, dataset, base_model, dispatcher)
    webhook = webhook_url(session, request, principal, settings)
    check_job_quota(session, principal.tenant_id, settings.limits)
    job = Job(tenant_id=principal.tenant_id, base_model_id=base_model.id, dataset_id=dataset.id, method=method,
              hyperparameters=hyperparameters, status="queued", idempotency_key=key, request_sha256=sha256,
              webhook_url=webhook)
    session.add(job)
    try:
        record(session, principal, job, "created", to_state="queued",
               detail={"method": method, "base_model": base_model.id, "dataset": dataset.id})
        session.commit()
    except IntegrityError:
        # A concurrent request with the same idempotency key committed first: its job is the answer.
        session.rollback()
        if (job := _existing(session, principal, key)) is not None:
            return _replayed(job, sha256, key_field), True
        raise
    log.info("job %s of %s queued (%s on %s)", job.id, job.tenant_id, method, base_model.name)
    send: Callable[[str], None] = dispatcher.job
    hand_job_to_queues(session, job, send, settings.tenant_dispatch_share)
    return job, False


def requeue_job(session: Session, principal: Principal, job_id: str, body, jobs_dir: Path) -> Job:
    """Queue the failed job ``job_id`` again with ``body``'s required ``reason`` (a ``RequeueRequest`` or its
    JSON); commits. It is held, as any job
    waiting for a dispatch slot of its tenant: the caller runs the fair dispatcher for the tenant
    (``gate.pipeline.fairness.dispatch_waiting``), which sends it first in its tenant's line if a slot is free;
    else a later slot, or the reaper's next pass, does.

    Raises ``gate.auth.Forbidden`` for a caller who is not an operator, ``ApiError`` for a missing reason (400),
    a missing job (404), or a job that is not ``failed`` (409)."""
    require_role(principal, OPERATOR)
    reason = parse_body(RequeueRequest, body).reason.strip()
    job = session.get(Job, job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    if job.status != "failed":
        raise ApiError(409, "not_failed", f"job {job.id} is {job.status}; only a failed job is queued again",
                       field="job")
    artifact = session.scalars(select(Artifact).where(Artifact.job_id == job.id)).one_or_none()
    if artifact is not None:  # its file stays until the sweep finds no row naming it
        session.delete(artifact)
    try:
        transition(session, job, "queued", principal, reason=reason,
                   changes={"attempts": 0, "error": None, "finished_at": None, "progress": 0.0,
                            "worker": None, "lease_expires_at": None, "dispatched_at": None, "stage": HELD_STAGE})
        session.commit()
    except StaleState:
        session.rollback()
        raise ApiError(409, "not_failed", f"job {job.id} was queued again by someone else first", field="job") \
            from None
    shutil.rmtree(jobs_dir / job.id, ignore_errors=True)  # resumable state and scratch of the failed attempt
    log.info("job %s queued again by %s: %s", job.id, principal.key_id, reason)
    session.refresh(job)
    return job
