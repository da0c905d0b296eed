"""A customer's cancel request, the hash an idempotent replay is checked against, and the job events a
customer follows.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

KINDS = ("stage", "loss", "sample", "checkpoint", "verdict")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("request_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "job_events",
        sa.Column("tenant_id", sa.String(63), nullable=False),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.CheckConstraint("kind IN ({})".format(", ".join(f"'{k}'" for k in KINDS)), name=op.f("ck_job_events_kind")),
        sa.ForeignKeyConstraint(["job_id", "tenant_id"], ["jobs.id", "jobs.tenant_id"],
                                name=op.f("fk_job_events_job_id_tenant_id_jobs")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_job_events_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
        sa.UniqueConstraint("job_id", "seq", name=op.f("uq_job_events_job_id_seq")),
    )
    op.create_index(op.f("ix_job_events_tenant_id"), "job_events", ["tenant_id"])


def downgrade() -> None:
    op.drop_table("job_events")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cancel_requested_at")
        batch.drop_column("request_sha256")
