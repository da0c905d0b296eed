"""What a job request must be before its row exists: known fields, a method that takes every hyperparameter,
each within the platform limits, a job that fits a worker's GPU, a well-formed idempotency key, a webhook target
that is the customer's. Each refusal is a 400 (or 409) naming the field, and the limit where one applies."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError
from sqlalchemy.orm import Session

from auditing.config import ConfigError, config_error, record, text
from gate.auth import Principal
from gate.pipeline.webhooks import URL_MAX_CHARS, RefusedTarget, check_target
from gate.settings import Limits, Settings
from gate.storage.models import METHODS, BaseModel, WebhookSecret
from gate.training import settings_for
from gate.training.memory import GIB, estimate_bytes, family_of

from .errors import ApiError, invalid
from .reviews import REASON_MAX_CHARS

# Hyperparameter -> the ``Limits`` field that bounds it (a number's maximum, a prompt's length); the training
# settings check types and the rest. The OpenAPI document publishes the same bounds.
PLATFORM_LIMITS = {"steps": "max_steps", "rank": "max_rank", "learning_rate": "max_learning_rate",
                   "resolution": "max_resolution", "batch_size": "max_batch_size",
                   "num_class_images": "max_class_images", "instance_prompt": "max_caption_chars",
                   "class_prompt": "max_caption_chars", "validation_prompt": "max_caption_chars"}
IDEMPOTENCY_KEY_MAX_CHARS = 200
KEY_HEADER = "Idempotency-Key"
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=IDEMPOTENCY_KEY_MAX_CHARS)]
WebhookUrl = Annotated[str, Field(max_length=URL_MAX_CHARS)]


@record
class JobRequest:
    """A customer's ``POST /v1/jobs``: a base model, an accepted dataset and the method's hyperparameters."""

    base_model: str = Field(description="a base model's id (GET /v1/base-models)")
    dataset: str = Field(description="an accepted dataset's id (GET /v1/datasets/{dataset_id})")
    method: Literal[METHODS]
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description=(
        "the method's settings, checked per method (unnamed ones take their defaults)"))
    idempotency_key: IdempotencyKey | None = Field(default=None, description=(
        "a client's key for this request, per tenant: the same one with the same parameters returns the job it "
        "created; the Idempotency-Key header is the same key"))
    webhook_url: WebhookUrl | None = Field(default=None, description=(
        "http(s) URL on a public address, posted each stage change and the verdict, signed (Ftgate-Signature); "
        "needs the tenant's webhook secret; null: the tenant's default URL, if any"))


@record
class WebhookRequest:
    """``PUT /v1/webhook``: the tenant's default webhook URL (null removes it)."""

    url: WebhookUrl | None


@record
class RequeueRequest:
    """An operator's ``POST /v1/jobs/{job_id}/requeue``: why the failed job runs again (its audit-log reason)."""

    reason: text(REASON_MAX_CHARS)


def bad(field: str, message: str, **extra) -> ApiError:
    return ApiError(400, "invalid_request", message, field=field, **extra)


def validate_hyperparameters(method: str, values: dict, limits: Limits) -> dict:
    """The hyperparameters if ``method`` takes every one (the training settings' own rules, ``gate.training``)
    and each is within the platform limits; else a 400 naming the field (and the limit)."""
    try:
        settings_for(method, values, "hyperparameters")
    except ConfigError as exc:
        raise invalid(exc) from None
    for name, value in values.items():
        if name not in PLATFORM_LIMITS or value is None:
            continue
        field, limit_name = f"hyperparameters.{name}", PLATFORM_LIMITS[name]
        limit = getattr(limits, limit_name)
        if isinstance(value, str) and len(value) > limit:
            raise bad(field, f"{field} has {len(value)} characters, more than {limit_name}={limit}",
                      limit=limit_name, maximum=limit)
        if not isinstance(value, str) and value > limit:
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


def request_sha256(request: JobRequest) -> str:
    """The hash a replay is checked against: the job's parameters as canonical JSON (keys sorted, no spaces)."""
    params = {name: value for name, value in asdict(request).items() if name != "idempotency_key"}
    return hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def idempotency_key(request: JobRequest, header: str | None) -> tuple[str | None, str]:
    """The request's idempotency key and the field it came in: the ``Idempotency-Key`` header (``header``) or the
    body's ``idempotency_key`` (both: they must agree)."""
    if header is None:
        return request.idempotency_key, "idempotency_key"
    if request.idempotency_key is not None and request.idempotency_key != header:
        raise bad(KEY_HEADER, f"the {KEY_HEADER} header and idempotency_key differ; send one of them")
    try:
        TypeAdapter(IdempotencyKey).validate_python(header)
    except ValidationError as exc:
        raise bad(KEY_HEADER, str(config_error(exc, KEY_HEADER)), maximum=IDEMPOTENCY_KEY_MAX_CHARS) from None
    return header, KEY_HEADER


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


def webhook_url(session: Session, request: JobRequest, principal: Principal, settings: Settings) -> str | None:
    """The job's webhook target, if it has one (``webhook_target``)."""
    url = request.webhook_url
    return None if url is None else webhook_target(session, url, "webhook_url", principal.tenant_id, settings)
