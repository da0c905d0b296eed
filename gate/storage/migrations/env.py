"""Alembic environment: migrates the connection that ``gate.storage.db`` hands over in the config."""

from __future__ import annotations

from alembic import context

from gate.storage.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("ftgate migrations run on a live connection: use `ftgate db upgrade`, not the alembic CLI")
# Batch mode lets later revisions alter SQLite tables (copy and move) with the same operations.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
