"""Who is calling: ``Authorization: Bearer <key>`` checked by ``gate.auth.authenticate`` on every /v1 view."""

from __future__ import annotations

import functools
from collections.abc import Callable

from flask import g, request

from gate.auth import Principal, authenticate, require_role

from .errors import ApiError

BEARER = "bearer "


def login_required(*roles: str) -> Callable:
    """View decorator: sets ``g.principal``; 401 without a valid key, 403 when ``roles`` is given and not met."""

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            header = request.headers.get("Authorization", "")
            presented = header[len(BEARER):].strip() if header.lower().startswith(BEARER) else None
            principal = authenticate(g.db, presented) if presented else None
            if principal is None:
                raise ApiError(401, "unauthorized", "a valid API key is required: 'Authorization: Bearer ftg_...'")
            if roles:
                require_role(principal, *roles)
            g.principal = principal
            return view(*args, **kwargs)

        return wrapped

    return decorator


def current_principal() -> Principal:
    return g.principal
