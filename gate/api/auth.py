"""Who is calling: ``Authorization: Bearer <key>`` checked by ``gate.auth.authenticate`` on every /v1 view."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import g, request

from gate.auth import Principal, authenticate, require_role

from .errors import ApiError

BEARER = "bearer "


def principal_required(find: Callable[[], Principal | None], refuse: Callable[[], Any],
                       roles: tuple[str, ...]) -> Callable:
    """View decorator for the API and the reviewer pages alike: sets ``g.principal`` from ``find()``; without
    one, what ``refuse()`` returns or raises; ``gate.auth.Forbidden`` (403) when ``roles`` is given and not met."""

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            principal = find()
            if principal is None:
                return refuse()
            if roles:
                require_role(principal, *roles)
            g.principal = principal
            return view(*args, **kwargs)

        return wrapped

    return decorator


def bearer_principal() -> Principal | None:
    """The principal of the request's bearer key, or None (missing, malformed, unknown or revoked)."""
    header = request.headers.get("Authorization", "")
    presented = header[len(BEARER):].strip() if header.lower().startswith(BEARER) else None
    return authenticate(g.db, presented) if presented else None


def _unauthorized():
    raise ApiError(401, "unauthorized", "a valid API key is required: 'Authorization: Bearer ftg_...'")


def login_required(*roles: str) -> Callable:
    """View decorator: sets ``g.principal``; 401 without a valid key, 403 when ``roles`` is given and not met."""
    return principal_required(bearer_principal, _unauthorized, roles)


def current_principal() -> Principal:
    return g.principal
