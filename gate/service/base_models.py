"""Registering the (hardened) base models customers may fine-tune, and finding them.

A base model is a local diffusers folder (``variant`` picks its ``*.fp16.safetensors``-style weights) or a
single ``.safetensors`` checkpoint with ``config``, a diffusers folder of the same architecture; ``vae``
replaces its VAE with another folder's. All are checked, and hashed together, at registration.

A base model comes with its audit profile (probes, detector, rendering); registering it dispatches its
baseline audit, the figures every job on it is compared with. If the broker cannot take that message the
registration still stands: the first job audited on the model audits its baseline first
(``gate.pipeline.audit.ensure_baseline``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from auditing.config import ConfigError, section, text
from auditing.config import record as request_record  # gate.storage.audit_log.record writes the audit log
from auditing.models.hashing import HashCache, weights_sha256
from auditing.models.sources import VARIANT, ModelSourceError, pipeline_files
from gate.pipeline.profile import AuditProfile
from gate.storage.audit_log import SYSTEM, ActorLike, record
from gate.storage.models import BaseModel

from .errors import ApiError, parse_body
from .pagination import MAX_LIMIT, Page, paginate

log = logging.getLogger(__name__)

NAME_MAX_CHARS = 200
PATH_MAX_CHARS = 4_096
SOURCE_FIELDS = ("config", "variant", "vae")  # how the model at ``path`` is loaded (gate.pipeline.base_model)
_FIELDS = {"source": "path"}  # ModelSourceError's field -> the request's


def _existing(path: str) -> str:
    if not Path(path).exists():
        raise ConfigError("path", "path must be an existing local diffusers folder or .safetensors "
                          f"checkpoint (got {path!r})")
    return path


LocalPath = text(PATH_MAX_CHARS)


@request_record
class BaseModelRequest:
    """An operator's registration: a model on the gate's machines and how its checkpoints are audited."""

    name: text(NAME_MAX_CHARS) = Field(description="unique; customers choose base models by it")
    path: Annotated[LocalPath, AfterValidator(_existing)] = Field(
        description="a local diffusers folder, or a single .safetensors checkpoint")
    config: LocalPath | None = Field(
        default=None, description="for a single-file path: a local diffusers folder of the same architecture")
    variant: Annotated[str, Field(pattern=f"^{VARIANT.pattern}$")] | None = Field(
        default=None, description="load the folder's *.<variant>.safetensors weights, e.g. fp16")
    vae: LocalPath | None = Field(default=None, description="a local AutoencoderKL folder used in place of the "
                                                            "model's VAE (e.g. an fp16-fix VAE)")
    audit_profile: section(AuditProfile)


def _absolute(path: str | None) -> str | None:
    """Stored absolute: workers need not share the registering process's working directory."""
    return None if path is None else str(Path(path).absolute())


def register_base_model(session: Session, body, actor: ActorLike, hash_cache: Path, dispatcher) -> BaseModel:
    """Check, hash and store the base model ``body`` describes (a ``BaseModelRequest`` or its JSON), then
    dispatch its baseline audit. Commits."""
    request = parse_body(BaseModelRequest, body)
    name, path, profile = request.name, request.path, request.audit_profile
    source = {field: getattr(request, field) for field in SOURCE_FIELDS}
    if session.scalars(select(BaseModel).where(BaseModel.name == name)).one_or_none() is not None:
        raise ApiError(409, "conflict", f"a base model named {name!r} exists", field="name")
    try:
        pipeline_files(path, **source)  # a lone .safetensors file hashes as one, but loads only with config
        digest = weights_sha256(path, HashCache(hash_cache), **source)
    except ModelSourceError as exc:
        raise ApiError(400, "invalid_request", str(exc), field=_FIELDS.get(exc.field, exc.field)) from None
    except (FileNotFoundError, ValueError) as exc:
        raise ApiError(400, "invalid_request", str(exc), field="path") from None
    row = BaseModel(name=name, path=_absolute(path), config_path=_absolute(source["config"]),
                    variant=source["variant"], vae_path=_absolute(source["vae"]), weights_sha256=digest,
                    audit_profile=profile.as_dict())
    session.add(row)
    record(session, actor, row, "created",
           detail={"path": row.path, "config": row.config_path, "variant": row.variant, "vae": row.vae_path,
                   "weights_sha256": digest, "audit_profile": row.audit_profile})
    session.commit()
    log.info("base model %s (%s) registered: %s", row.id, name, digest)
    try:
        dispatcher.baseline(row.id)
    except Exception as exc:  # the broker is down: the model stays registered, its first audit makes the baseline
        log.exception("baseline of base model %s could not be queued", row.id)
        record(session, SYSTEM, row, "baseline not queued",
               reason=f"{type(exc).__name__}; the first job audited on this model audits the baseline first")
        session.commit()
    return row


def list_base_models(session: Session, limit: int = MAX_LIMIT, cursor: str | None = None) -> Page:
    """Oldest first, a page at a time."""
    return paginate(session, select(BaseModel), BaseModel.created_at, BaseModel.id, limit, cursor)


def get_base_model(session: Session, base_model_id: str) -> BaseModel:
    row = session.get(BaseModel, base_model_id)
    if row is None:
        raise ApiError(404, "not_found", f"no base model {base_model_id!r}")
    return row
