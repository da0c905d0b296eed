"""Durable webhooks: the outbox of deliveries owed (written with their event, retried from the database) and
each tenant's default webhook URL.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

STATES = ("pending", "delivered", "abandoned")


def upgrade() -> None:
    with op.batch_alter_table("webhook_secrets") as batch:
        batch.add_column(sa.Column("url", sa.Text(), nullable=True))
    op.create_table(
        "webhook_outbox",
        sa.Column("tenant_id", sa.String(63), nullable=False),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("event_seq", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("state IN ({})".format(", ".join(f"'{s}'" for s in STATES)),
                           name=op.f("ck_webhook_outbox_state")),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_webhook_outbox_attempts")),
        sa.ForeignKeyConstraint(["job_id", "tenant_id"], ["jobs.id", "jobs.tenant_id"],
                                name=op.f("fk_webhook_outbox_job_id_tenant_id_jobs")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_webhook_outbox_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_outbox")),
        sa.UniqueConstraint("job_id", "event_seq", name=op.f("uq_webhook_outbox_job_id_event_seq")),
    )
    op.create_index(op.f("ix_webhook_outbox_tenant_id"), "webhook_outbox", ["tenant_id"])
    op.create_index(op.f("ix_webhook_outbox_state_next_attempt_at"), "webhook_outbox", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("webhook_outbox")
    with op.batch_alter_table("webhook_secrets") as batch:
        batch.drop_column("url")
