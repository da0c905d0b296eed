"""Which checkpoint each audit audited (its sha256), so a job queued again and retrained is audited anew:
an audit belongs to the exact artifact it examined, never to the job in general. Audits from before are
given their job's artifact: until now a job had only ever one.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audits") as batch:
        batch.add_column(sa.Column("artifact_sha256", sa.String(64), nullable=True))
    op.execute("UPDATE audits SET artifact_sha256 = "
               "(SELECT sha256 FROM artifacts WHERE artifacts.job_id = audits.job_id)")


def downgrade() -> None:
    with op.batch_alter_table("audits") as batch:
        batch.drop_column("artifact_sha256")
