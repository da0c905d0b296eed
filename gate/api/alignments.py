"""``/v1/alignments``: operators start ResAlign hardening runs on the ``align`` queue and follow them."""

from __future__ import annotations

import logging

from flask import Blueprint, g, request

from alignment.config import config_from_mapping
from gate.storage.audit_log import record
from gate.storage.models import AlignmentRun

from . import gate
from .auth import current_principal, login_required
from .errors import ApiError
from .serialize import alignment_json

log = logging.getLogger(__name__)

bp = Blueprint("alignments", __name__, url_prefix="/v1/alignments")
OPERATOR = "operator"
NAME_MAX_CHARS = 200


@bp.post("")
@login_required(OPERATOR)
def start():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "send a JSON object {name, config}")
    name, config = body.get("name"), body.get("config")
    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX_CHARS:
        raise ApiError(400, "invalid_request", f"name must be a string of 1 to {NAME_MAX_CHARS} characters",
                       field="name")
    try:
        config_from_mapping(config)  # the same validation as `ftgate align --config`
    except (TypeError, ValueError) as exc:
        raise ApiError(400, "invalid_request", f"config: {exc}", field="config") from None
    principal = current_principal()
    run = AlignmentRun(name=name, config=config, requested_by=principal.key_id)
    g.db.add(run)
    record(g.db, principal, run, "created", to_state="queued", detail={"name": name})
    g.db.commit()
    gate().dispatcher.alignment(run.id)
    return alignment_json(run), 201


@bp.get("/<run_id>")
@login_required(OPERATOR)
def get(run_id: str):
    run = g.db.get(AlignmentRun, run_id)
    if run is None:
        raise ApiError(404, "not_found", f"no hardening run {run_id!r}")
    return alignment_json(run)
