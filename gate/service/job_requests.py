"""What a job request must be before its row exists: known fields, a method that takes every hyperparameter,
each within the platform limits, a job that fits a worker's GPU, a well-formed idempotency key, a webhook target
that is the customer's. Each refusal is a 400 (or 409) naming the field, and the limit where one applies."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy.orm import Session

from gate.auth import Principal
from gate.pipeline.webhooks import URL_MAX_CHARS, RefusedTarget, check_target
from gate.settings import Limits, Settings
from gate.storage.models import BaseModel, WebhookSecret
from gate.training import HYPERPARAMETERS, settings_for
from gate.training.memory import GIB, estimate_bytes, family_of

from .errors import ApiError

# Hyperparameter -> the ``Limits`` field that bounds it; the training settings check types and the rest.
HYPERPARAMETER_LIMITS = {"steps": "max_steps", "rank": "max_rank", "learning_rate": "max_learning_rate",
                         "resolution": "max_resolution", "batch_size": "max_batch_size",
                         "num_class_images": "max_class_images"}
PROMPT_HYPERPARAMETERS = ("instance_prompt", "class_prompt", "validation_prompt")  # held to max_caption_chars
IDEMPOTENCY_KEY_MAX_CHARS = 200
FIELDS = ("base_model", "dataset", "method", "hyperparameters", "idempotency_key", "webhook_url")
KEY_HEADER = "Idempotency-Key"


def bad(field: str, message: str, **extra) -> ApiError:
    return ApiError(400, "invalid_request", message, field=field, **extra)


def check_fields(body: Any) -> dict:
    """``body`` if it is a JSON object of known fields only."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "send a JSON object (Content-Type: application/json)")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise bad(unknown[0], f"unknown field(s) {unknown}; allowed: {list(FIELDS)}", allowed=list(FIELDS))
    return body


def validate_hyperparameters(method: str, values: Any, limits: Limits) -> dict:
    """The hyperparameters if ``method`` takes every one and each is within the platform limits; else a 400
    naming the field. Types and per-field rules are the training settings' own (``gate.training``)."""
    if not isinstance(values, dict):
        raise bad("hyperparameters", "hyperparameters must be an object")
    allowed = list(HYPERPARAMETERS[method])
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise bad(f"hyperparameters.{unknown[0]}", f"unknown {method} hyperparameter(s) {unknown}; allowed: "
                  f"{allowed}", allowed=allowed)
    try:
        settings_for(method, values)
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        raise bad(f"hyperparameters.{name}", f"hyperparameters.{exc}") from None
    for name, value in values.items():
        field = f"hyperparameters.{name}"
        if name in PROMPT_HYPERPARAMETERS and value is not None and len(value) > limits.max_caption_chars:
            raise bad(field, f"{field} has {len(value)} characters, more than max_caption_chars="
                             f"{limits.max_caption_chars}", limit="max_caption_chars",
                      maximum=limits.max_caption_chars)
        if name not in HYPERPARAMETER_LIMITS or value is None:
            continue
        limit_name = HYPERPARAMETER_LIMITS[name]
        limit = getattr(limits, limit_name)
        if value > limit:
            raise bad(field, f"{field} must be at most {limit:g} (limit {limit_name}; got {value!r})",
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
        raise bad("hyperparameters", f"hyperparameters: this {family} {method} job needs about {need:.1f} GiB of GPU "
                                     f"memory, more than a worker has (limit worker_gpu_memory_gib="
                                     f"{limits.worker_gpu_memory_gib:g}); lower batch_size or resolution, or set "
                                     f"mixed_precision or gradient_checkpointing (docs/training.md, GPU memory)",
                  limit="worker_gpu_memory_gib", maximum=limits.worker_gpu_memory_gib, estimate_gib=round(need, 1))


def request_sha256(body: dict) -> str:
    """The hash a replay is checked against: the job's parameters as canonical JSON (keys sorted, no spaces)."""
    params = {name: body.get(name) for name in FIELDS if name != "idempotency_key"}
    params["hyperparameters"] = body.get("hyperparameters", {})
    return hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def idempotency_key(body: dict, header: str | None) -> tuple[str | None, str]:
    """The request's idempotency key and the field it came in: the ``Idempotency-Key`` header (``header``) or the
    body's ``idempotency_key`` (both: they must agree)."""
    field = "idempotency_key"
    key = body.get(field)
    if header is not None:
        if key is not None and key != header:
            raise bad(KEY_HEADER, f"the {KEY_HEADER} header and idempotency_key differ; send one of them")
        key, field = header, KEY_HEADER
    if key is not None and not (isinstance(key, str) and 0 < len(key) <= IDEMPOTENCY_KEY_MAX_CHARS):
        raise bad(field, f"{field} must be a string of 1 to {IDEMPOTENCY_KEY_MAX_CHARS} characters",
                  maximum=IDEMPOTENCY_KEY_MAX_CHARS)
    return key, field


def webhook_target(session: Session, url: str | None, field: str, tenant_id: str, settings: Settings) -> str | None:
    """``url`` (null allowed) if it is a public http(s) URL (``gate.pipeline.webhooks``; any address where the
    operator allows private targets) and the tenant has a signing secret to sign deliveries with: nothing is
    sent unsigned. A job's ``webhook_url`` and a tenant's default URL are held to this alike."""
    if url is not None:
        try:
            check_target(url, settings.webhook_private_targets == "allow")
        except RefusedTarget as exc:
            raise bad(field, f"{field} {exc}", maximum=URL_MAX_CHARS) from None
    if session.get(WebhookSecret, tenant_id) is None:
        raise ApiError(409, "webhook_secret_missing", f"{field} needs the tenant's signing secret: create it first "
                                                      "(POST /v1/webhook-secret)", field=field)
    return url


def webhook_url(session: Session, body: dict, principal: Principal, settings: Settings) -> str | None:
    """The job's webhook target, if it has one (``webhook_target``)."""
    url = body.get("webhook_url")
    return None if url is None else webhook_target(session, url, "webhook_url", principal.tenant_id, settings)
