"""``/v1/alignments``: operators start ResAlign hardening runs on the ``align`` queue and follow them."""

from __future__ import annotations

import logging

from flask import Blueprint, g

from alignment.config import config_from_mapping
from gate.service.queueing import hand_to_queues
from gate.storage.audit_log import record
from gate.storage.models import AlignmentRun

from . import gate
from .auth import current_principal, login_required
from .errors import ApiError, bounded_text, json_object
from .serialize import alignment_json

log = logging.getLogger(__name__)

bp = Blueprint("alignments", __name__, url_prefix="/v1/alignments")
OPERATOR = "operator"
NAME_MAX_CHARS = 200


@bp.post("")
@login_required(OPERATOR)
def start():
    body = json_object("{name, config}")
    name, config = bounded_text(body, "name", NAME_MAX_CHARS), body.get("config")
    try:
        config_from_mapping(config)  # the same validation as `ftgate align --config`
    except (TypeError, ValueError) as exc:
        raise ApiError(400, "invalid_request", f"config: {exc}", field="config") from None
    principal = current_principal()
    run = AlignmentRun(name=name, config=config, requested_by=principal.key_id)
    g.db.add(run)
    record(g.db, principal, run, "created", to_state="queued", detail={"name": name})
    g.db.commit()
    hand_to_queues(g.db, run, lambda: gate().dispatcher.alignment(run.id), "run")
    return alignment_json(run), 201


@bp.get("/<run_id>")
@login_required(OPERATOR)
def get(run_id: str):
    run = g.db.get(AlignmentRun, run_id)
    if run is None:
        raise ApiError(404, "not_found", f"no hardening run {run_id!r}")
    return alignment_json(run)
