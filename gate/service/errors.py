"""A refusal in the API's error shape, raised by the service layer and the routes alike, and the requests it is
raised for: a JSON body or a query string read into its record (``auditing.config``), any fault a 400
``invalid_request`` naming the dotted field (and ``allowed``, ``limit``, ``maximum`` where they apply)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from pydantic import TypeAdapter, ValidationError

from auditing.config import ConfigError, config_error, from_mapping


class ApiError(Exception):
    """A request the gate refuses; ``extra`` keys are added to the error body (e.g. ``field``, ``allowed``)."""

    def __init__(self, status: int, reason: str, message: str, **extra):
        super().__init__(message)
        self.status, self.reason, self.message, self.extra = status, reason, message, extra


def invalid(exc: ConfigError) -> ApiError:
    """A value a record refused, as a 400 naming its field (with what the error holds for the client)."""
    return ApiError(400, "invalid_request", str(exc), field=exc.field, **exc.detail)


def shape(cls) -> str:
    """``cls``'s fields as a refusal shows them, e.g. ``{name, path, config?}`` (``?``: optional)."""
    names = [name + ("" if info.is_required() else "?") for name, info in cls.__pydantic_fields__.items()]
    return "{" + ", ".join(names) + "}"


def parse_body(cls, body: Any):
    """``body`` (a request's parsed JSON; an instance of ``cls`` passes as it is) as the record ``cls``."""
    if isinstance(body, cls):
        return body
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", f"send a JSON object {shape(cls)} (Content-Type: application/json)")
    try:
        return from_mapping(cls, body, "")
    except ConfigError as exc:
        raise invalid(exc) from None


def parse_query(cls, args: Mapping[str, str]):
    """The record ``cls`` from a query string: its own parameters (others are not its business), strings read as
    the numbers they spell (``limit=10``); the record's bounds hold as for a body."""
    known = {f.name: args[f.name] for f in fields(cls) if f.name in args}
    try:
        return TypeAdapter(cls).validate_python(known, strict=False)
    except ValidationError as exc:
        raise invalid(config_error(exc, "", cls)) from None
