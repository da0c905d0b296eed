"""How many times each hardening run has been started, so one that keeps losing its worker fails after
``max_attempts`` as a job does, instead of being handed back for ever.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("alignment_runs") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.create_check_constraint(op.f("ck_alignment_runs_attempts"), "attempts >= 0")


def downgrade() -> None:
    with op.batch_alter_table("alignment_runs") as batch:
        batch.drop_constraint(op.f("ck_alignment_runs_attempts"), type_="check")
        batch.drop_column("attempts")
