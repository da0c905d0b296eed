"""Who is signed in to the reviewer pages, and proof that a form was posted from them.

A reviewer (or customer) signs in once with an API key typed into a form; the key itself is never stored
or put in a URL. The session is a row of ``web_sessions`` (``gate.storage.models.WebSession``); the cookie
holds only a random value whose sha256 is the row's id. Signing out deletes the row, so a copy of the cookie
stops working with it; a session expires ``SESSION_HOURS`` after sign-in (checked on the row), and every
request re-reads the key row, so revoking the key ends its sessions at once. The cookie is restricted to the
pages' path, ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's page sends it) and
``Secure`` whenever the request came over HTTPS.

Every POST must carry the session's CSRF token in a hidden form field (compared in constant time). A visitor
not yet signed in gets a row holding only a token for the sign-in form; sign-in replaces the row, and with
it the cookie and the token (a session id planted before sign-in is worthless after it).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import urlsplit

from flask import abort, g, redirect, request, url_for

from gate.api.auth import principal_required
from gate.auth import Principal
from gate.storage.models import ApiKey, WebSession, utcnow

COOKIE_NAME = "ftgate_review"
PAGES_PATH = "/review"  # the blueprint's prefix and the cookie's path
SESSION_HOURS = 8  # one working day; then sign in again
CSRF_FIELD = "csrf_token"
_UNSET = object()


def _row_id(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()


def current_session() -> WebSession | None:
    """The request's unexpired session row, looked up once per request."""
    if "web_session" not in g:
        cookie = request.cookies.get(COOKIE_NAME)
        row = g.db.get(WebSession, _row_id(cookie)) if cookie else None
        g.web_session = row if row is not None and row.expires_at > utcnow() else None
    return g.web_session


def _start(key_id: str | None) -> WebSession:
    """A new session row, committed, whose cookie the response sets; the request's old row is deleted."""
    old = current_session()
    if old is not None:
        g.db.delete(old)
    cookie = secrets.token_urlsafe(32)
    now = utcnow()
    row = WebSession(id=_row_id(cookie), key_id=key_id, csrf_token=secrets.token_urlsafe(32), created_at=now,
                     expires_at=now + timedelta(hours=SESSION_HOURS))
    g.db.add(row)
    g.db.commit()
    g.web_session, g.web_cookie = row, cookie
    return row


def sign_in(principal: Principal) -> None:
    """Start a fresh session for ``principal`` (nothing from before sign-in survives, the CSRF token neither)."""
    _start(principal.key_id)


def sign_out() -> None:
    """Delete the session's row: the cookie, and every copy of it, signs nobody in any more."""
    row = current_session()
    if row is not None:
        g.db.delete(row)
        g.db.commit()
    g.web_session, g.web_cookie = None, None


def set_cookie(response):
    """``after_request``: send the cookie of a session started (or ended) by this request."""
    cookie = g.get("web_cookie", _UNSET)
    if cookie is None:
        response.delete_cookie(COOKIE_NAME, path=PAGES_PATH, httponly=True, samesite="Strict")
    elif cookie is not _UNSET:
        response.set_cookie(COOKIE_NAME, cookie, path=PAGES_PATH, httponly=True, samesite="Strict",
                            secure=request.is_secure)
    return response


def signed_in_principal(db) -> Principal | None:
    """The session's principal, if it is signed in and its key still exists and is not revoked."""
    row = current_session()
    key = db.get(ApiKey, row.key_id) if row is not None and row.key_id is not None else None
    if key is None or key.revoked_at is not None:
        return None
    return Principal(key.id, key.tenant_id, key.role)


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
    """The session's CSRF token for a form; a visitor without a session gets one for the sign-in form."""
    row = current_session() or _start(None)
    return row.csrf_token


def check_csrf() -> None:
    """Refuse (400) a POST whose form does not carry the session's CSRF token."""
    if request.method != "POST":
        return
    row, sent = current_session(), request.form.get(CSRF_FIELD)
    if not (row is not None and isinstance(sent, str) and hmac.compare_digest(row.csrf_token.encode(), sent.encode())):
        abort(400, "the form's security token is missing or out of date; reload the page and try again")
