"""``/v1/alignments``: operators start ResAlign hardening runs on the ``align`` queue and follow them."""

from __future__ import annotations

import logging

from flask import Blueprint, g, request
from pydantic import Field

from alignment.config import AlignConfig
from auditing.config import record, section, text
from gate.service.queueing import hand_to_queues
from gate.storage.audit_log import record as log_record
from gate.storage.models import AlignmentRun

from . import gate
from .auth import current_principal, login_required
from .errors import ApiError, parse_body
from .serialize import alignment_json

log = logging.getLogger(__name__)

bp = Blueprint("alignments", __name__, url_prefix="/v1/alignments")
OPERATOR = "operator"
NAME_MAX_CHARS = 200


@record
class AlignmentRequest:
    """An operator's hardening run: a name, and the config ``ftgate align --config`` takes."""

    name: text(NAME_MAX_CHARS)
    config: section(AlignConfig) = Field(description="an `ftgate align --config` file's content, as JSON "
                                                     "(docs/alignment.md)")


@bp.post("")
@login_required(OPERATOR)
def start():
    sent = request.get_json(silent=True)
    name = parse_body(AlignmentRequest, sent).name  # the config checked as `ftgate align --config` checks it
    config = sent["config"]  # stored as sent: the worker builds the run from it
    principal = current_principal()
    run = AlignmentRun(name=name, config=config, requested_by=principal.key_id)
    g.db.add(run)
    log_record(g.db, principal, run, "created", to_state="queued", detail={"name": name})
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
