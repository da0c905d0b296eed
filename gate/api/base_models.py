"""``/v1/base-models``: operators register the (hardened) base models customers may fine-tune.

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


@bp.post("")
@login_required(OPERATOR)
def register():
    body = json_object("{name, path, audit_profile}")
    name, path = bounded_text(body, "name", NAME_MAX_CHARS), body.get("path")
    if not isinstance(path, str) or not Path(path).is_dir():
        raise ApiError(400, "invalid_request", f"path must be an existing local diffusers folder (got {path!r})",
                       field="path")
    try:
        profile = AuditProfile.from_dict(body.get("audit_profile"))
    except (TypeError, ValueError) as exc:
        raise ApiError(400, "invalid_request", str(exc), field="audit_profile") from None
    if g.db.scalars(select(BaseModel).where(BaseModel.name == name)).one_or_none() is not None:
        raise ApiError(409, "conflict", f"a base model named {name!r} exists", field="name")
    try:
        digest = weights_sha256(path, HashCache(gate().settings.hash_cache_file))
    except (FileNotFoundError, ValueError) as exc:
        raise ApiError(400, "invalid_request", str(exc), field="path") from None
    row = BaseModel(name=name, path=str(Path(path).absolute()), weights_sha256=digest,
                    audit_profile=profile.as_dict())
    g.db.add(row)
    record(g.db, current_principal(), row, "created", detail={"path": row.path, "weights_sha256": digest,
                                                              "audit_profile": row.audit_profile})
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
