"""``/v1/jobs``: a customer asks for a fine-tuning job; it is validated here, queued, and run by a worker.

Everything a job asks for is checked against the platform limits before the row exists, so workers can
trust a queued job. The row and its audit entry are committed before ``enqueue`` is called: a worker
that picks the id up always finds the row. A retried POST with the same ``idempotency_key`` gets the
job it already created (200) and enqueues nothing.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from flask import Blueprint, g, request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gate.auth import CUSTOMER, get_for_principal, scoped
from gate.auth import NotFound as RowNotFound
from gate.settings import Limits
from gate.storage.audit_log import record
from gate.storage.models import METHODS, BaseModel, Dataset, Job

from . import gate
from .auth import current_principal, login_required
from .errors import ApiError
from .serialize import job_json

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

# Hyperparameter -> the ``Limits`` field that bounds it. ``seed`` is free (any integer >= 0).
HYPERPARAMETER_LIMITS = {"steps": "max_steps", "rank": "max_rank", "learning_rate": "max_learning_rate",
                         "resolution": "max_resolution", "batch_size": "max_batch_size"}
HYPERPARAMETERS = (*HYPERPARAMETER_LIMITS, "seed")
FLOAT_HYPERPARAMETERS = ("learning_rate",)
TRAINABLE_DATASETS = ("accepted", "flagged")
IDEMPOTENCY_KEY_MAX_CHARS = 200
FIELDS = ("base_model", "dataset", "method", "hyperparameters", "idempotency_key")


def _bad(field: str, message: str, **extra) -> ApiError:
    return ApiError(400, "invalid_request", message, field=field, **extra)


def validate_hyperparameters(values: Any, limits: Limits) -> dict:
    """The hyperparameters if every one is known and within the platform limits; else a 400 naming it."""
    if not isinstance(values, dict):
        raise _bad("hyperparameters", "hyperparameters must be an object")
    unknown = sorted(set(values) - set(HYPERPARAMETERS))
    if unknown:
        raise _bad(f"hyperparameters.{unknown[0]}", f"unknown hyperparameter(s) {unknown}; allowed: "
                   f"{list(HYPERPARAMETERS)}", allowed=list(HYPERPARAMETERS))
    for name, value in values.items():
        field = f"hyperparameters.{name}"
        is_float = name in FLOAT_HYPERPARAMETERS
        ok_type = isinstance(value, (int, float)) if is_float else isinstance(value, int)
        if isinstance(value, bool) or not ok_type or (is_float and not math.isfinite(value)):
            raise _bad(field, f"{field} must be {'a number' if is_float else 'an integer'} (got {value!r})")
        if name == "seed":
            if value < 0:
                raise _bad(field, f"{field} must be >= 0 (got {value!r})")
            continue
        limit_name = HYPERPARAMETER_LIMITS[name]
        limit = getattr(limits, limit_name)
        low, rule = (0, f"in (0, {limit:g}]") if is_float else (1, f"in [1, {limit}]")
        if not (value > 0 if is_float else value >= low) or value > limit:
            raise _bad(field, f"{field} must be {rule} (limit {limit_name}={limit:g}; got {value!r})",
                       limit=limit_name, maximum=limit)
    return dict(values)


def _existing(principal, key: str | None) -> Job | None:
    if key is None:
        return None
    return g.db.scalars(select(Job).where(Job.tenant_id == principal.tenant_id, Job.idempotency_key == key)) \
        .one_or_none()


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
    key = body.get("idempotency_key")
    if key is not None and not (isinstance(key, str) and 0 < len(key) <= IDEMPOTENCY_KEY_MAX_CHARS):
        raise _bad("idempotency_key", f"idempotency_key must be a string of 1 to {IDEMPOTENCY_KEY_MAX_CHARS} "
                                      "characters")
    if (job := _existing(principal, key)) is not None:
        return job_json(job), 200
    method = body.get("method")
    if method not in METHODS:
        raise _bad("method", f"method must be one of {list(METHODS)} (got {method!r})", allowed=list(METHODS))
    hyperparameters = validate_hyperparameters(body.get("hyperparameters", {}), app.settings.limits)
    for name in ("base_model", "dataset"):
        if not isinstance(body.get(name), str):
            raise _bad(name, f"{name} must be the id of a {name.replace('_', ' ')}")
    base_model = g.db.get(BaseModel, body["base_model"])
    if base_model is None:
        raise ApiError(404, "not_found", f"no base model {body['base_model']!r}", field="base_model")
    try:
        dataset = get_for_principal(g.db, Dataset, body["dataset"], principal)
    except RowNotFound:
        raise ApiError(404, "not_found", f"no dataset {body['dataset']!r}", field="dataset") from None
    if dataset.status not in TRAINABLE_DATASETS:
        raise ApiError(409, "dataset_not_trainable", f"dataset {dataset.id} is {dataset.status}; jobs need one of "
                                                     f"{list(TRAINABLE_DATASETS)}", field="dataset")
    job = Job(tenant_id=principal.tenant_id, base_model_id=base_model.id, dataset_id=dataset.id, method=method,
              hyperparameters=hyperparameters, status="queued", idempotency_key=key)
    g.db.add(job)
    try:
        record(g.db, principal, job, "created", to_state="queued",
               detail={"method": method, "base_model": base_model.id, "dataset": dataset.id})
        g.db.commit()
    except IntegrityError:
        # A concurrent POST with the same idempotency key committed first: return its job.
        g.db.rollback()
        if (job := _existing(principal, key)) is not None:
            return job_json(job), 200
        raise
    log.info("job %s of %s queued (%s on %s)", job.id, job.tenant_id, method, base_model.name)
    app.enqueue(job.id)
    return job_json(job), 201


@bp.get("/<job_id>")
@login_required()
def get(job_id: str):
    return job_json(get_for_principal(g.db, Job, job_id, current_principal()))


@bp.get("")
@login_required()
def list_jobs():
    principal = current_principal()
    rows = g.db.scalars(scoped(select(Job), Job, principal).order_by(Job.created_at.desc(), Job.id)).all()
    return {"jobs": [job_json(row) for row in rows]}
