"""Who is signed in to the reviewer pages, and proof that a form was posted from them.

A reviewer (or customer) signs in once with an API key typed into a form; the key itself is never stored
or put in a URL. The session is Flask's signed cookie holding only the key's id, restricted to the pages'
path, ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's page sends it) and
``Secure`` whenever the request came over HTTPS. It expires after ``SESSION_HOURS`` (checked on the
signature's timestamp, server side), and every request re-reads the key row, so revoking the key ends
its sessions at once.

Every POST must carry the session's CSRF token in a hidden form field (compared in constant time); the
token is made with the session and replaced at sign-in.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, abort, g, redirect, request, session, url_for
from flask.sessions import SecureCookieSessionInterface

from gate.api.auth import principal_required
from gate.auth import Principal
from gate.storage.models import ApiKey

from .secret import session_key

COOKIE_NAME = "ftgate_review"
SESSION_HOURS = 8  # one working day; then sign in again
CSRF_FIELD = "csrf_token"


class _CookieSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, with ``Secure`` set from the request (HTTPS directly, or through a
    proxy that ``werkzeug.middleware.proxy_fix.ProxyFix`` trusts)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure


def configure(app: Flask, state_dir: Path, path: str) -> None:
    """Sign the app's session cookies with the deployment's key; the cookie goes to ``path`` only."""
    app.secret_key = session_key(state_dir)
    app.session_interface = _CookieSessions()
    app.config.update(SESSION_COOKIE_NAME=COOKIE_NAME, SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_PATH=path,
                      PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS))


def sign_in(principal: Principal) -> None:
    """Start a fresh session for ``principal`` (nothing from before sign-in survives, the CSRF token neither)."""
    session.clear()
    session["key_id"] = principal.key_id
    session[CSRF_FIELD] = secrets.token_urlsafe(32)


def sign_out() -> None:
    session.clear()


def signed_in_principal(db) -> Principal | None:
    """The session's principal, if its key still exists and is not revoked."""
    key_id = session.get("key_id")
    row = db.get(ApiKey, key_id) if isinstance(key_id, str) else None
    if row is None or row.revoked_at is not None:
        session.pop("key_id", None)
        return None
    return Principal(row.id, row.tenant_id, row.role)


def _to_sign_in():
    """Back here after signing in (a link from a ticket, say)."""
    wanted = request.full_path.rstrip("?") if request.method == "GET" else None
    return redirect(url_for("web.login", next=wanted), 303)


def signed_in(*roles: str) -> Callable:
    """View decorator: sets ``g.principal`` from the session, or sends the browser to the sign-in form;
    ``gate.auth.Forbidden`` (403) when ``roles`` is given and not met."""
    return principal_required(lambda: signed_in_principal(g.db), _to_sign_in, roles)


def safe_next(value: str | None, prefix: str) -> str | None:
    """``value`` if it is a path under the pages' own ``prefix`` (never another site: no scheme, no host)."""
    parts = urlsplit(value or "")
    if parts.scheme or parts.netloc or "\\" in (value or "") or not parts.path.startswith(f"{prefix}/"):
        return None
    return value


def csrf_token() -> str:
    """The session's CSRF token for a form, made on first use."""
    if CSRF_FIELD not in session:
        session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return session[CSRF_FIELD]


def check_csrf() -> None:
    """Refuse (400) a POST whose form does not carry the session's CSRF token."""
    if request.method != "POST":
        return
    expected, sent = session.get(CSRF_FIELD), request.form.get(CSRF_FIELD)
    if not (isinstance(expected, str) and isinstance(sent, str) and hmac.compare_digest(expected.encode(), sent.encode())):
        abort(400, "the form's security token is missing or out of date; reload the page and try again")
