"""A refusal in the API's error shape, raised by the service layer and the routes alike."""

from __future__ import annotations


class ApiError(Exception):
    """A request the gate refuses; ``extra`` keys are added to the error body (e.g. ``field``, ``allowed``)."""

    def __init__(self, status: int, reason: str, message: str, **extra):
        super().__init__(message)
        self.status, self.reason, self.message, self.extra = status, reason, message, extra


def bounded_text(body: dict, field: str, max_chars: int) -> str:
    """``body[field]`` if it is a string of 1 to ``max_chars`` characters; else a 400 naming the field."""
    value = body.get(field)
    if not isinstance(value, str) or not value.strip() or len(value) > max_chars:
        raise ApiError(400, "invalid_request", f"{field} must be a string of 1 to {max_chars} characters",
                       field=field)
    return value
