"""Dataset intake on a worker: the prepared dataset's store key, the intake's figures per detector, the stage's
lease, attempts and dispatch (for the reaper), its last error, and the statuses ``screening`` and ``failed``.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

OLD_STATUSES = ("received", "flagged", "accepted", "rejected")
NEW_STATUSES = ("received", "screening", "flagged", "accepted", "rejected", "failed")


def _status_check(statuses) -> str:
    return "status IN ({})".format(", ".join(f"'{s}'" for s in statuses))


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("prepared_path", sa.Text(), nullable=True))
        batch.add_column(sa.Column("intake", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("worker", sa.String(200), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("error", sa.Text(), nullable=True))
        batch.drop_constraint(op.f("ck_datasets_status"), type_="check")
        batch.create_check_constraint(op.f("ck_datasets_status"), _status_check(NEW_STATUSES))
        batch.create_check_constraint(op.f("ck_datasets_attempts"), "attempts >= 0")


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_constraint(op.f("ck_datasets_attempts"), type_="check")
        batch.drop_constraint(op.f("ck_datasets_status"), type_="check")
        batch.create_check_constraint(op.f("ck_datasets_status"), _status_check(OLD_STATUSES))
        for column in ("error", "dispatched_at", "lease_expires_at", "worker", "attempts", "intake", "prepared_path"):
            batch.drop_column(column)
