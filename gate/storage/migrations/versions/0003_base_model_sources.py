"""Base models as users keep them: a weight variant, a separate VAE folder, a single file's config folder.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Null on rows before this revision: a plain diffusers folder, loaded and hashed as before.
    with op.batch_alter_table("base_models") as batch:
        batch.add_column(sa.Column("config_path", sa.Text(), nullable=True))
        batch.add_column(sa.Column("variant", sa.String(32), nullable=True))
        batch.add_column(sa.Column("vae_path", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("base_models") as batch:
        batch.drop_column("vae_path")
        batch.drop_column("variant")
        batch.drop_column("config_path")
