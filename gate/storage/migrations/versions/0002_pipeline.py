"""The worker pipeline: how each base model is audited, the kind of each artifact, and hardening runs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("base_models") as batch:
        batch.add_column(sa.Column("audit_profile", sa.JSON(), nullable=True))
    with op.batch_alter_table("artifacts") as batch:
        # Rows before this revision were LoRA files: that was the only method that stored one.
        batch.add_column(sa.Column("kind", sa.String(8), nullable=False, server_default="lora"))
    with op.batch_alter_table("artifacts") as batch:
        batch.alter_column("kind", server_default=None)
        batch.create_check_constraint(op.f("ck_artifacts_kind"), "kind IN ('lora', 'unet')")
    op.create_table(
        "alignment_runs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Double(), nullable=False),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("output_path", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("requested_by", sa.String(16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('queued', 'running', 'failed', 'succeeded')",
                           name=op.f("ck_alignment_runs_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alignment_runs")),
    )
    op.create_index(op.f("ix_alignment_runs_status"), "alignment_runs", ["status"])


def downgrade() -> None:
    op.drop_table("alignment_runs")
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_constraint(op.f("ck_artifacts_kind"), type_="check")
        batch.drop_column("kind")
    with op.batch_alter_table("base_models") as batch:
        batch.drop_column("audit_profile")
