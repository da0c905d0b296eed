"""``/v1/jobs``: a customer asks for a fine-tuning job; it is validated here, queued, and run by a worker.

Everything a job asks for is checked against the platform limits before the row exists, so workers can
trust a queued job. The row and its audit entry are committed before the dispatcher is called: a worker
that picks the id up always finds the row. A retried POST with the same ``Idempotency-Key`` (header, or
the body's ``idempotency_key``) and the same parameters gets the job it already created (200) and
dispatches nothing; the same key with other parameters is a 409. A job the queues cannot take (the broker
is down) is failed at once with a 503 (``gate.api.queueing``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from flask import Blueprint, g, request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gate.auth import CUSTOMER, get_for_principal, scoped
from gate.auth import NotFound as RowNotFound
from gate.pipeline.cancel import request_cancel
from gate.pipeline.fairness import dispatch_waiting
from gate.pipeline.webhooks import RefusedTarget, check_target
from gate.service.datasets import require_trainable
from gate.service.jobs import requeue_job
from gate.service.pagination import page_request, paginate
from gate.settings import Limits
from gate.storage.audit_log import record
from gate.storage.models import METHODS, BaseModel, Dataset, Job, WebhookSecret
from gate.training import HYPERPARAMETERS, settings_for
from gate.training.memory import GIB, estimate_bytes, family_of

from . import gate
from .auth import current_principal, login_required
from .errors import ApiError, json_object
from .queueing import hand_job_to_queues
from .quotas import check_job_quota
from .serialize import job_json

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

# Hyperparameter -> the ``Limits`` field that bounds it; the training settings check types and the rest.
HYPERPARAMETER_LIMITS = {"steps": "max_steps", "rank": "max_rank", "learning_rate": "max_learning_rate",
                         "resolution": "max_resolution", "batch_size": "max_batch_size",
                         "num_class_images": "max_class_images"}
PROMPT_HYPERPARAMETERS = ("instance_prompt", "class_prompt", "validation_prompt")  # held to max_caption_chars
IDEMPOTENCY_KEY_MAX_CHARS = 200
FIELDS = ("base_model", "dataset", "method", "hyperparameters", "idempotency_key", "webhook_url")
KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"  # Stripe's name: set on the answer to a replay


def _bad(field: str, message: str, **extra) -> ApiError:
    return ApiError(400, "invalid_request", message, field=field, **extra)


def validate_hyperparameters(method: str, values: Any, limits: Limits) -> dict:
    """The hyperparameters if ``method`` takes every one and each is within the platform limits; else a 400
    naming the field. Types and per-field rules are the training settings' own (``gate.training``)."""
    if not isinstance(values, dict):
        raise _bad("hyperparameters", "hyperparameters must be an object")
    allowed = list(HYPERPARAMETERS[method])
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise _bad(f"hyperparameters.{unknown[0]}", f"unknown {method} hyperparameter(s) {unknown}; allowed: "
                   f"{allowed}", allowed=allowed)
    try:
        settings_for(method, values)
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        raise _bad(f"hyperparameters.{name}", f"hyperparameters.{exc}") from None
    for name, value in values.items():
        field = f"hyperparameters.{name}"
        if name in PROMPT_HYPERPARAMETERS and value is not None and len(value) > limits.max_caption_chars:
            raise _bad(field, f"{field} has {len(value)} characters, more than max_caption_chars="
                              f"{limits.max_caption_chars}", limit="max_caption_chars",
                       maximum=limits.max_caption_chars)
        if name not in HYPERPARAMETER_LIMITS or value is None:
            continue
        limit_name = HYPERPARAMETER_LIMITS[name]
        limit = getattr(limits, limit_name)
        if value > limit:
            raise _bad(field, f"{field} must be at most {limit:g} (limit {limit_name}; got {value!r})",
                       limit=limit_name, maximum=limit)
    return dict(values)


def check_fits(method: str, hyperparameters: dict, base_model: BaseModel, limits: Limits) -> None:
    """A 400 naming ``hyperparameters`` if the job's GPU-memory estimate exceeds a worker's GPU
    (``limits.worker_gpu_memory_gib``; 0 checks nothing); base models of no published family are not checked."""
    if not limits.worker_gpu_memory_gib:
        return
    family = family_of(base_model.config_path or base_model.path)
    if family is None:
        return
    need = estimate_bytes(family, method, settings_for(method, hyperparameters)) / GIB
    if need > limits.worker_gpu_memory_gib:
        raise _bad("hyperparameters", f"hyperparameters: this {family} {method} job needs about {need:.1f} GiB of GPU "
                                      f"memory, more than a worker has (limit worker_gpu_memory_gib="
                                      f"{limits.worker_gpu_memory_gib:g}); lower batch_size or resolution, or set "
                                      f"mixed_precision or gradient_checkpointing (docs/training.md, GPU memory)",
                   limit="worker_gpu_memory_gib", maximum=limits.worker_gpu_memory_gib, estimate_gib=round(need, 1))


def _existing(principal, key: str | None) -> Job | None:
    if key is None:
        return None
    return g.db.scalars(select(Job).where(Job.tenant_id == principal.tenant_id, Job.idempotency_key == key)) \
        .one_or_none()


def request_sha256(body: dict) -> str:
    """The hash a replay is checked against: the job's parameters as canonical JSON (keys sorted, no spaces)."""
    params = {name: body.get(name) for name in FIELDS if name != "idempotency_key"}
    params["hyperparameters"] = body.get("hyperparameters", {})
    return hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _idempotency_key(body: dict) -> tuple[str | None, str]:
    """The request's idempotency key and the field it came in: the ``Idempotency-Key`` header or the body's
    ``idempotency_key`` (both: they must agree)."""
    header, field = request.headers.get(KEY_HEADER), "idempotency_key"
    key = body.get(field)
    if header is not None:
        if key is not None and key != header:
            raise _bad(KEY_HEADER, f"the {KEY_HEADER} header and idempotency_key differ; send one of them")
        key, field = header, KEY_HEADER
    if key is not None and not (isinstance(key, str) and 0 < len(key) <= IDEMPOTENCY_KEY_MAX_CHARS):
        raise _bad(field, f"{field} must be a string of 1 to {IDEMPOTENCY_KEY_MAX_CHARS} characters",
                   maximum=IDEMPOTENCY_KEY_MAX_CHARS)
    return key, field


def _webhook_url(body: dict, principal, settings) -> str | None:
    """The job's webhook target, if it has one: a public http(s) URL (``gate.pipeline.webhooks``), for a tenant
    that has a signing secret to sign its deliveries with."""
    url = body.get("webhook_url")
    if url is None:
        return None
    try:
        check_target(url, settings.webhook_private_targets == "allow")
    except RefusedTarget as exc:
        raise _bad("webhook_url", f"webhook_url {exc}") from None
    if g.db.get(WebhookSecret, principal.tenant_id) is None:
        raise ApiError(409, "webhook_secret_missing", "webhook_url needs the tenant's signing secret: create it "
                                                      "first (POST /v1/webhook-secret)", field="webhook_url")
    return url


def _replay(job: Job, sha256: str, field: str):
    """The answer to a replayed key: the job it created (200), if the parameters are the first request's; a job
    from before parameters were hashed (``request_sha256`` null) cannot be checked and is returned."""
    if job.request_sha256 is not None and job.request_sha256 != sha256:
        raise ApiError(409, "idempotency_conflict", f"{field} {job.idempotency_key!r} was first used for job "
                                                    f"{job.id} with other parameters; use a new key", field=field)
    return job_json(job), 200, {REPLAYED_HEADER: "true"}


@bp.post("")
@login_required(CUSTOMER)
def create():
    principal, app = current_principal(), gate()
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "send a JSON object (Content-Type: application/json)")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise _bad(unknown[0], f"unknown field(s) {unknown}; allowed: {list(FIELDS)}", allowed=list(FIELDS))
    key, key_field = _idempotency_key(body)
    sha256 = request_sha256(body)
    if (job := _existing(principal, key)) is not None:
        return _replay(job, sha256, key_field)
    method = body.get("method")
    if method not in METHODS:
        raise _bad("method", f"method must be one of {list(METHODS)} (got {method!r})", allowed=list(METHODS))
    hyperparameters = validate_hyperparameters(method, body.get("hyperparameters", {}), app.settings.limits)
    for name in ("base_model", "dataset"):
        if not isinstance(body.get(name), str):
            raise _bad(name, f"{name} must be the id of a {name.replace('_', ' ')}")
    base_model = g.db.get(BaseModel, body["base_model"])
    if base_model is None:
        raise ApiError(404, "not_found", f"no base model {body['base_model']!r}", field="base_model")
    check_fits(method, hyperparameters, base_model, app.settings.limits)
    try:
        dataset = get_for_principal(g.db, Dataset, body["dataset"], principal)
    except RowNotFound:
        raise ApiError(404, "not_found", f"no dataset {body['dataset']!r}", field="dataset") from None
    require_trainable(g.db, principal, dataset, base_model, app.dispatcher)
    webhook_url = _webhook_url(body, principal, app.settings)
    check_job_quota(g.db, principal.tenant_id, app.settings.limits)
    job = Job(tenant_id=principal.tenant_id, base_model_id=base_model.id, dataset_id=dataset.id, method=method,
              hyperparameters=hyperparameters, status="queued", idempotency_key=key,
              request_sha256=sha256, webhook_url=webhook_url)
    g.db.add(job)
    try:
        record(g.db, principal, job, "created", to_state="queued",
               detail={"method": method, "base_model": base_model.id, "dataset": dataset.id})
        g.db.commit()
    except IntegrityError:
        # A concurrent POST with the same idempotency key committed first: return its job.
        g.db.rollback()
        if (job := _existing(principal, key)) is not None:
            return _replay(job, sha256, key_field)
        raise
    log.info("job %s of %s queued (%s on %s)", job.id, job.tenant_id, method, base_model.name)
    hand_job_to_queues(job, app.dispatcher.job, app.settings.tenant_dispatch_share)
    return job_json(job), 201


@bp.get("/<job_id>")
@login_required()
def get(job_id: str):
    from .results import job_detail

    principal = current_principal()
    return job_detail(get_for_principal(g.db, Job, job_id, principal), principal.cross_tenant)


@bp.post("/<job_id>/cancel")
@login_required(CUSTOMER)
def cancel(job_id: str):
    """202: a queued job is ``cancelled`` now, a training one stops at its next step (``gate.pipeline.cancel``)."""
    principal = current_principal()
    return job_json(request_cancel(g.db, get_for_principal(g.db, Job, job_id, principal), principal)), 202


@bp.post("/<job_id>/requeue")
@login_required("operator")
def requeue(job_id: str):
    """202: a failed job queued again from a clean state, with a reason (``gate.service.jobs.requeue_job``)."""
    app = gate()
    job = requeue_job(g.db, current_principal(), job_id, json_object("{reason}"), app.settings.jobs_dir)
    dispatch_waiting(g.db, app.dispatcher.job, app.settings.tenant_dispatch_share, tenants=[job.tenant_id])
    g.db.refresh(job)
    return job_json(job, staff=True), 202


@bp.get("")
@login_required()
def list_jobs():
    """The caller's jobs (staff: every tenant's), newest first, a page at a time."""
    principal = current_principal()
    page = paginate(g.db, scoped(select(Job), Job, principal), Job.created_at, Job.id, *page_request(request.args),
                    newest_first=True)
    return {"jobs": [job_json(row, principal.cross_tenant) for row in page.rows], "next_cursor": page.next_cursor}
