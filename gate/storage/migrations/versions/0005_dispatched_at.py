"""When each job's and hardening run's latest message was owed to the queues, so the reaper's reconciler can
tell a message that was never delivered (queued long ago, never started) from a fresh one.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ("jobs", "alignment_runs")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
    # Rows from before: their last change is the best record of when their message went out.
    op.execute("UPDATE jobs SET dispatched_at = updated_at")
    op.execute("UPDATE alignment_runs SET dispatched_at = created_at")


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("dispatched_at")
