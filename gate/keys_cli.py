"""``ftgate keys create|list|revoke``: API keys, managed by an operator on the gate's host.

``create`` prints the new key on stdout and nowhere else (``KEY=$(ftgate keys create ...)``); the
database keeps only its hash, so it can never be shown again. ``list`` never shows secrets.
"""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import Engine, select

from .auth import NotFound, create_key, ensure_tenant, revoke_key
from .settings import load_settings
from .storage.audit_log import SYSTEM
from .storage.db import make_engine, require_current, session_factory
from .storage.models import ROLES, ApiKey


def _engine() -> Engine:
    engine = make_engine(load_settings().database_url)
    require_current(engine)
    return engine


def _cmd_create(args) -> int:
    with session_factory(_engine()).begin() as session:
        ensure_tenant(session, args.tenant, SYSTEM)
        issued = create_key(session, args.tenant, args.role, SYSTEM, name=args.name)
    print(f"created {issued.role} key {issued.key_id} for tenant {issued.tenant_id}; "
          "the key below is shown only now", file=sys.stderr)
    print(issued.key)
    return 0


def _cmd_list(args) -> int:
    statement = select(ApiKey).order_by(ApiKey.tenant_id, ApiKey.created_at)
    if args.tenant:
        statement = statement.where(ApiKey.tenant_id == args.tenant)
    with session_factory(_engine())() as session:
        for key in session.scalars(statement):
            revoked = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
            print(f"{key.id}  {key.tenant_id:<20} {key.role:<9} {revoked:<24} {key.name or ''}")
    return 0


def _cmd_revoke(args) -> int:
    try:
        with session_factory(_engine()).begin() as session:
            revoke_key(session, args.key_id, SYSTEM, reason=args.reason)
    except NotFound as exc:
        print(f"ftgate: error: {exc}", file=sys.stderr)
        return 2
    print(f"revoked {args.key_id}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``keys`` subcommand to the ``ftgate`` parser."""
    keys = sub.add_parser("keys", help="API keys: create (printed once), list, revoke")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="create a key (and its tenant if new); prints the key once")
    create.add_argument("--tenant", required=True, help="tenant id (lower-case letters, digits, '-', '_')")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--name", help="a label for people, e.g. who holds the key")
    create.set_defaults(func=_cmd_create)
    listing = ksub.add_parser("list", help="list keys (ids, tenants, roles; never secrets)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.set_defaults(func=_cmd_list)
    revoke = ksub.add_parser("revoke", help="revoke a key by its id (the 12 hex characters after ftg_)")
    revoke.add_argument("key_id")
    revoke.add_argument("--reason", help="recorded in the audit log")
    revoke.set_defaults(func=_cmd_revoke)
