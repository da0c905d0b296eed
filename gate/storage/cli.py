"""``ftgate db upgrade|current``: the database schema, migrated explicitly by an operator.

The API, workers and other commands refuse to run on a schema that is not at the code's head revision,
so upgrading a deployment is one deliberate step rather than a side effect of whichever process starts first.
"""

from __future__ import annotations

import argparse

from ..settings import load_settings
from .db import current_revision, head_revision, make_engine, upgrade


def _cmd_upgrade(args) -> int:
    print(f"database at revision {upgrade(load_settings().database_url)}")
    return 0


def _cmd_current(args) -> int:
    current, head = current_revision(make_engine(load_settings().database_url)), head_revision()
    print(f"database at revision {current or 'none (empty)'}; code head {head}")
    return 0 if current == head else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``db`` subcommand to the ``ftgate`` parser."""
    db = sub.add_parser("db", help="database schema: upgrade (Alembic migrations), current")
    dsub = db.add_subparsers(dest="db_command", required=True)
    up = dsub.add_parser("upgrade", help="migrate the configured database to the code's schema")
    up.set_defaults(func=_cmd_upgrade)
    current = dsub.add_parser("current", help="show the schema revision; exit 1 if it is not the code's head")
    current.set_defaults(func=_cmd_current)
