"""Engines, sessions and schema migrations for the gate's database (SQLite embedded, PostgreSQL deployed).

The schema is only ever created by Alembic (``upgrade``), never by ``metadata.create_all``, so the
database a test sees is the database production gets. Processes check ``require_current`` at start-up
and refuse to run against a schema older or newer than their code.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 10_000
# Serialises concurrent `upgrade` calls (API and workers starting together) on PostgreSQL.
MIGRATION_LOCK_ID = 0x66746761  # "ftga"


class SchemaNotCurrent(ValueError):
    """The database's schema revision is not the code's; reported like bad configuration (exit 2)."""


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite; the tenancy keys rely on it
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (API) do not block the writer (a worker)
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def make_engine(url: str, **kwargs) -> Engine:
    """An engine for ``url``; for a SQLite file, its folder is created and the pragmas set on every connection."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (views serialise them after committing)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(connection: Connection | None = None) -> Config:
    """The migrations' configuration, from the installed package (no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", "gate.storage:migrations")
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(url: str | Engine, revision: str = "head") -> str | None:
    """Migrate the database at ``url`` to ``revision``; returns the revision it is at afterwards."""
    engine = make_engine(url) if isinstance(url, str) else url
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        command.upgrade(alembic_config(connection), revision)
    now = current_revision(engine)
    log.info("database %s at revision %s", engine.url.render_as_string(hide_password=True), now)
    return now


def require_current(engine: Engine) -> None:
    """Raise ``SchemaNotCurrent`` unless the database is at the code's head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaNotCurrent(f"database {engine.url.render_as_string(hide_password=True)} is at schema revision "
                               f"{current or 'none (empty)'}, this code needs {head}: run `ftgate db upgrade`")
