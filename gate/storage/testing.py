"""Throwaway databases for tests of anything built on the gate's storage.

PostgreSQL tests each get a fresh schema with a random name (selected through ``search_path`` in the URL
they receive), dropped afterwards, so parallel runs on one server never see each other's rows, and the
append-only audit log (which refuses DELETE) never needs cleaning.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError

POSTGRES_TEST_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_unavailable(url: str = POSTGRES_TEST_URL) -> str | None:
    """Why PostgreSQL at ``url`` cannot be used (a reason to skip with), or None when it can."""
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return None
    except OperationalError as exc:
        return f"PostgreSQL at {make_url(url).render_as_string(hide_password=True)} is unreachable: {exc.orig}"
    finally:
        engine.dispose()


@contextmanager
def postgres_schema(url: str = POSTGRES_TEST_URL) -> Iterator[str]:
    """Yield a URL whose connections work in a new empty schema; the schema is dropped on exit."""
    schema = f"ftgate_test_{secrets.token_hex(6)}"
    admin = create_engine(url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        scoped = make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield scoped.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
