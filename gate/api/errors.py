"""One JSON error format for every failure, so clients never parse HTML or see a stack trace.

Body: ``{"error": {"status", "reason", "message", ...}}``; ``reason`` is a short fixed code a client can
branch on, ``message`` is for people.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from auditing.config import ConfigError
from gate.auth import Forbidden, NotFound
from gate.intake import IntakeError
from gate.service.errors import ApiError, invalid, parse_body

log = logging.getLogger(__name__)


def json_body(cls):
    """The request's JSON body as the record ``cls`` (``gate.service.errors.parse_body``): a 400 naming the
    field, or saying what to send."""
    return parse_body(cls, request.get_json(silent=True))


def error_response(status: int, reason: str, message: str, **extra):
    return jsonify({"error": {"status": status, "reason": reason, "message": message, **extra}}), status


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.reason, exc.message, **exc.extra)

    @app.errorhandler(ConfigError)
    def _config_error(exc: ConfigError):  # a record built in a route refused a value the client sent
        return _api_error(invalid(exc))

    @app.errorhandler(IntakeError)
    def _intake_error(exc: IntakeError):  # an upload over max_upload_bytes; the rest is the worker's intake
        body = exc.as_dict()
        return jsonify({"error": body}), exc.status

    @app.errorhandler(Forbidden)
    def _forbidden(exc: Forbidden):
        return error_response(403, "forbidden", str(exc))

    @app.errorhandler(NotFound)
    def _not_found(exc: NotFound):
        return error_response(404, "not_found", str(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        reason = (exc.name or "error").lower().replace(" ", "_")
        return error_response(exc.code or 500, reason, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; see the server log")
