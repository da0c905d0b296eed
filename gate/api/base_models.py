"""``/v1/base-models``: operators register the (hardened) base models customers may fine-tune.

A base model is a local diffusers folder (``variant`` picks its ``*.fp16.safetensors``-style weights) or a
single ``.safetensors`` checkpoint with ``config``, a diffusers folder of the same architecture; ``vae``
replaces its VAE with another folder's. All are checked, and hashed together, at registration.

A base model comes with its audit profile (probes, detector, rendering); registering it dispatches its
baseline audit, the figures every job on it is compared with. If the broker cannot take that message the
registration still stands: the first job audited on the model audits its baseline first
(``gate.pipeline.audit.ensure_baseline``). Customers list base models to choose one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flask import Blueprint, g
from sqlalchemy import select

from auditing.models.hashing import HashCache, weights_sha256
from auditing.models.sources import ModelSourceError, pipeline_files
from gate.pipeline.profile import AuditProfile
from gate.storage.audit_log import SYSTEM, record
from gate.storage.models import BaseModel

from . import gate
from .auth import current_principal, login_required
from .errors import ApiError, bounded_text, json_object
from .serialize import base_model_json

log = logging.getLogger(__name__)

bp = Blueprint("base_models", __name__, url_prefix="/v1/base-models")
OPERATOR = "operator"
NAME_MAX_CHARS = 200
PATH_MAX_CHARS = 4_096
SOURCE_FIELDS = ("config", "variant", "vae")  # how the model at ``path`` is loaded (gate.pipeline.base_model)
_FIELDS = {"source": "path"}  # ModelSourceError's field -> the request's


def _optional_text(body: dict, field: str) -> str | None:
    return None if body.get(field) is None else bounded_text(body, field, PATH_MAX_CHARS)


def _absolute(path: str | None) -> str | None:
    """Stored absolute: workers need not share the API's working directory."""
    return None if path is None else str(Path(path).absolute())


@bp.post("")
@login_required(OPERATOR)
def register():
    body = json_object("{name, path, audit_profile, config?, variant?, vae?}")
    name, path = bounded_text(body, "name", NAME_MAX_CHARS), body.get("path")
    if not isinstance(path, str) or not Path(path).exists():
        raise ApiError(400, "invalid_request", "path must be an existing local diffusers folder or .safetensors "
                       f"checkpoint (got {path!r})", field="path")
    source = {field: _optional_text(body, field) for field in SOURCE_FIELDS}
    try:
        profile = AuditProfile.from_dict(body.get("audit_profile"))
    except (TypeError, ValueError) as exc:
        raise ApiError(400, "invalid_request", str(exc), field="audit_profile") from None
    if g.db.scalars(select(BaseModel).where(BaseModel.name == name)).one_or_none() is not None:
        raise ApiError(409, "conflict", f"a base model named {name!r} exists", field="name")
    try:
        pipeline_files(path, **source)  # a lone .safetensors file hashes as one, but loads only with config
        digest = weights_sha256(path, HashCache(gate().settings.hash_cache_file), **source)
    except ModelSourceError as exc:
        raise ApiError(400, "invalid_request", str(exc), field=_FIELDS.get(exc.field, exc.field)) from None
    except (FileNotFoundError, ValueError) as exc:
        raise ApiError(400, "invalid_request", str(exc), field="path") from None
    row = BaseModel(name=name, path=_absolute(path), config_path=_absolute(source["config"]),
                    variant=source["variant"], vae_path=_absolute(source["vae"]), weights_sha256=digest,
                    audit_profile=profile.as_dict())
    g.db.add(row)
    record(g.db, current_principal(), row, "created",
           detail={"path": row.path, "config": row.config_path, "variant": row.variant, "vae": row.vae_path,
                   "weights_sha256": digest, "audit_profile": row.audit_profile})
    g.db.commit()
    log.info("base model %s (%s) registered: %s", row.id, name, digest)
    try:
        gate().dispatcher.baseline(row.id)
    except Exception as exc:  # the broker is down: the model stays registered, its first audit makes the baseline
        log.exception("baseline of base model %s could not be queued", row.id)
        record(g.db, SYSTEM, row, "baseline not queued",
               reason=f"{type(exc).__name__}; the first job audited on this model audits the baseline first")
        g.db.commit()
    return base_model_json(row), 201


@bp.get("")
@login_required()
def list_base_models():
    rows = g.db.scalars(select(BaseModel).order_by(BaseModel.created_at, BaseModel.id)).all()
    staff = current_principal().cross_tenant
    return {"base_models": [base_model_json(row, staff) for row in rows]}


@bp.get("/<base_model_id>")
@login_required()
def get(base_model_id: str):
    row = g.db.get(BaseModel, base_model_id)
    if row is None:
        raise ApiError(404, "not_found", f"no base model {base_model_id!r}")
    return base_model_json(row, current_principal().cross_tenant)
