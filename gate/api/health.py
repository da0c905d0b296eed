"""``/healthz`` (for load balancers: is the database reachable?) and ``/openapi.json``; no auth on either."""

from __future__ import annotations

import logging

from flask import Blueprint, g
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from . import gate
from .openapi import openapi_document

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    try:
        g.db.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log.error("health check: database unreachable: %s", exc)
        return {"status": "unavailable", "database": "unreachable"}, 503
    return {"status": "ok", "database": "ok"}


@bp.get("/openapi.json")
def openapi():
    return openapi_document(gate().settings.limits)
