"""Rate limits per API key (flask-limiter): ``settings.rate_limit`` requests per period for each key.

A caller without a valid key is counted by its address instead, so guessing keys (on ``/v1`` or the
reviewer pages' sign-in form) is limited too; a signed-in browser counts against its session's key. Counts
live in the broker's Redis when ``broker_url`` is set, so every API process of a deployment shares them (and
each process falls back to its own memory while Redis is away); with the embedded broker, in each process's
memory. ``/healthz`` and ``/metrics`` are never counted: a monitor must see the service even when a client
is being throttled. A request over the limit is a 429 in the API's error shape (on the
reviewer pages, an error page), with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from flask import Flask, request
from flask_limiter import Limiter, RateLimitExceeded

from gate.auth import Principal
from gate.settings import Settings

from .auth import bearer_principal
from .errors import error_response


def storage_uri(settings: Settings) -> str:
    """The broker's Redis in the ``limits`` package's URL forms, or process memory without a configured one."""
    url = settings.broker_url
    if url is None:
        return "memory://"
    parts = urlsplit(url)
    if parts.scheme == "redis+socket":  # kombu's socket form; limits spells it redis+unix with ?db=
        db = parse_qs(parts.query).get("virtual_host", ["0"])[0]
        return f"redis+unix://{parts.path}?db={db}"
    return url


def client_key(pages_principal: Callable[[], Principal | None]) -> Callable[[], str]:
    """Whom a request is counted against: its API key (bearer, or on the reviewer pages the signed-in session's,
    ``pages_principal()``), else its address."""
    def key() -> str:
        principal = bearer_principal() or (pages_principal() if request.blueprint == "web" else None)
        return f"key:{principal.key_id}" if principal is not None else f"address:{request.remote_addr}"

    return key


def install(app: Flask, settings: Settings, exempt: tuple, pages_principal: Callable[[], Principal | None]) -> Limiter:
    """Limit every route of ``app`` but the ``exempt`` blueprints to ``settings.rate_limit`` per client
    (``pages_principal``: the reviewer pages' signed-in principal, given by the app that mounts them)."""
    limiter = Limiter(client_key(pages_principal), app=app, application_limits=[settings.rate_limit],
                      storage_uri=storage_uri(settings),
                      headers_enabled=True, in_memory_fallback_enabled=True, key_prefix="ftgate-rate")
    for blueprint in exempt:
        limiter.exempt(blueprint)

    @app.errorhandler(RateLimitExceeded)
    def _rate_limited(exc: RateLimitExceeded):
        return error_response(429, "rate_limited", f"too many requests from this API key (or, without a valid key, "
                              f"this address): at most {exc.limit.limit} (limit rate_limit={settings.rate_limit}); "
                              "retry after Retry-After seconds", limit="rate_limit", maximum=str(exc.limit.limit))

    return limiter
