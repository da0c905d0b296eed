"""Baselines in the artifact store: one row per (base model, audit profile hash on a device) naming the
report's store key (tenant ``platform``) and its hash, so every worker host reuses the first host's baseline
instead of auditing it again. A baseline audited before, in a host's local folder that the base model still
names, is moved to the store by that host on first use (``gate.pipeline.audit``); no data moves here.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "baselines",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("base_model_id", sa.String(32), nullable=False),
        sa.Column("profile_sha256", sa.String(64), nullable=False),
        sa.Column("report_key", sa.Text(), nullable=False),
        sa.Column("report_sha256", sa.String(64), nullable=False),
        sa.Column("html_key", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["base_model_id"], ["base_models.id"],
                                name=op.f("fk_baselines_base_model_id_base_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_baselines")),
        sa.UniqueConstraint("base_model_id", "profile_sha256", name=op.f("uq_baselines_base_model_id_profile_sha256")),
    )


def downgrade() -> None:
    op.drop_table("baselines")
