"""API keys, roles and tenancy: who is calling, and what they may see.

A key reads ``ftg_<key id>_<secret>``. The key id (12 hex characters) is stored in clear as the row's
primary key, so a presented key is found with one indexed lookup, and names the key in logs and in the
audit log. The secret is ``secrets.token_urlsafe(32)``, 256 random bits; only its sha256 is stored, and
the stored and presented hashes are compared with ``hmac.compare_digest`` so the time taken reveals
nothing about how much of a guess matched. sha256 rather than bcrypt/scrypt/argon2: slow hashes protect
low-entropy passwords against guessing, but 256 random bits cannot be guessed at any hashing speed, and a
slow hash would cost every API request tens of milliseconds of CPU. A copy of the table yields no key.

Roles: a ``customer`` sees only its own tenant's rows; a ``reviewer`` and an ``operator`` (platform staff,
whose keys belong to the platform's own tenant) see every tenant's. What each role may *do* is decided
where the action is (``require_role``). A row of another tenant is reported exactly like a missing one
(``NotFound``), so ids cannot be probed across tenants.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass, field

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from .storage.audit_log import ActorLike, record
from .storage.models import ROLES, ApiKey, Tenant, TenantOwned, check_tenant_id, utcnow

log = logging.getLogger(__name__)

KEY_PREFIX = "ftg_"
KEY_PATTERN = re.compile(rf"{KEY_PREFIX}([0-9a-f]{{12}})_([A-Za-z0-9_-]{{43}})")
CUSTOMER = "customer"


class Forbidden(PermissionError):
    """The caller's role may not do this (HTTP 403)."""


class NotFound(LookupError):
    """No such row visible to the caller: missing, or another tenant's (HTTP 404)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. Also an audit log actor (``key_id``, ``role``)."""

    key_id: str
    tenant_id: str
    role: str

    @property
    def cross_tenant(self) -> bool:
        return self.role != CUSTOMER


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    tenant_id: str
    role: str
    key: str = field(repr=False)  # the only time the secret exists outside its holder's hands


def _secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def ensure_tenant(session: Session, tenant_id: str, actor: ActorLike, name: str | None = None) -> Tenant:
    """The tenant ``tenant_id``, created (and logged) if it does not exist yet."""
    tenant = session.get(Tenant, check_tenant_id(tenant_id))
    if tenant is None:
        tenant = Tenant(id=tenant_id, name=name or tenant_id)
        session.add(tenant)
        record(session, actor, tenant, "created")
    return tenant


def create_key(session: Session, tenant_id: str, role: str, actor: ActorLike, *, name: str | None = None) -> IssuedKey:
    """A new key for an existing tenant; only its hash is stored. The caller commits."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {list(ROLES)}; got {role!r}")
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    row = ApiKey(id=key_id, tenant_id=check_tenant_id(tenant_id), role=role, name=name,
                 secret_sha256=_secret_hash(secret))
    session.add(row)
    record(session, actor, row, "created", detail={"role": role, "name": name})
    return IssuedKey(key_id, tenant_id, role, f"{KEY_PREFIX}{key_id}_{secret}")


def revoke_key(session: Session, key_id: str, actor: ActorLike, reason: str | None = None) -> ApiKey:
    """Revoke a key (idempotent: revoking a revoked key changes and logs nothing)."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        record(session, actor, row, "revoked", reason=reason)
    return row


def authenticate(session: Session, presented: str | None) -> Principal | None:
    """The principal for a presented key, or None for a malformed, unknown, wrong or revoked key."""
    match = KEY_PATTERN.fullmatch(presented or "")
    if match is None:
        return None
    key_id, secret = match.groups()
    row = session.get(ApiKey, key_id)
    if row is None or not hmac.compare_digest(_secret_hash(secret), row.secret_sha256):
        log.info("rejected API key %s: unknown key or wrong secret", key_id)
        return None
    if row.revoked_at is not None:
        log.info("rejected API key %s: revoked", key_id)
        return None
    return Principal(row.id, row.tenant_id, row.role)


def require_role(principal: Principal, *roles: str) -> None:
    if principal.role not in roles:
        raise Forbidden(f"role {principal.role!r} may not do this; it needs one of {list(roles)}")


def scoped(statement: Select, model: type[TenantOwned], principal: Principal) -> Select:
    """``statement`` restricted to the principal's tenant, unless the principal is platform staff."""
    if not issubclass(model, TenantOwned):
        raise TypeError(f"{model.__name__} is not owned by a tenant; it is shared, not scoped")
    return statement if principal.cross_tenant else statement.where(model.tenant_id == principal.tenant_id)


def get_for_principal(session: Session, model: type[TenantOwned], id: str, principal: Principal):
    """The ``model`` row ``id`` if the principal may see it; ``NotFound`` if it is missing or another tenant's."""
    row = session.scalars(scoped(select(model).where(model.id == id), model, principal)).one_or_none()
    if row is None:
        raise NotFound(f"no {model.__tablename__} row {id!r}")
    return row
