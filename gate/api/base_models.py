"""``/v1/base-models``: operators register the (hardened) base models customers may fine-tune
(``gate.service.base_models`` checks, hashes and stores them); customers list base models to choose one."""

from __future__ import annotations

from flask import Blueprint, g, request

from gate.service.base_models import get_base_model, list_base_models, register_base_model
from gate.service.pagination import page_request

from . import gate
from .auth import current_principal, login_required
from .serialize import base_model_json

bp = Blueprint("base_models", __name__, url_prefix="/v1/base-models")
OPERATOR = "operator"


@bp.post("")
@login_required(OPERATOR)
def register():
    app = gate()
    row = register_base_model(g.db, request.get_json(silent=True), current_principal(), app.settings.hash_cache_file,
                              app.dispatcher)
    return base_model_json(row), 201


@bp.get("")
@login_required()
def list_all():
    staff = current_principal().cross_tenant
    page = list_base_models(g.db, *page_request(request.args))
    return {"base_models": [base_model_json(row, staff) for row in page.rows], "next_cursor": page.next_cursor}


@bp.get("/<base_model_id>")
@login_required()
def get(base_model_id: str):
    return base_model_json(get_base_model(g.db, base_model_id), current_principal().cross_tenant)
