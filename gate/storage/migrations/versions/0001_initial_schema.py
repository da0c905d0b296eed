"""Initial schema: tenants, API keys, base models, datasets, jobs, artifacts, audits, verdicts, reviews and
the append-only audit log (with the triggers that refuse UPDATE and DELETE on it).

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

APPEND_ONLY = "audit_log is append-only"


def _when() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def _tenant_columns(table: str) -> list:
    """``tenant_id`` referencing tenants, as ``gate.storage.models.TenantOwned`` declares it."""
    return [sa.Column("tenant_id", sa.String(63), nullable=False),
            sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f(f"fk_{table}_tenant_id_tenants"))]


def _same_tenant_fk(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column, "tenant_id"], [f"{target}.id", f"{target}.tenant_id"],
                                   name=op.f(f"fk_{table}_{column}_tenant_id_{target}"))


def _one_of(table: str, column: str, values: tuple[str, ...]) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=op.f(f"ck_{table}_{column}"))


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor_key_id", sa.String(16), nullable=True),
        sa.Column("actor_role", sa.String(16), nullable=False),
        sa.Column("tenant_id", sa.String(63), nullable=True),
        sa.Column("entity_type", sa.String(32), nullable=False),
        sa.Column("entity_id", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("from_state", sa.String(32), nullable=True),
        sa.Column("to_state", sa.String(32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        _one_of("audit_log", "actor_role", ("customer", "reviewer", "operator", "system")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_entity_type_entity_id"), "audit_log", ["entity_type", "entity_id"])
    op.create_index(op.f("ix_audit_log_tenant_id_at"), "audit_log", ["tenant_id", "at"])

    op.create_table(
        "base_models",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("baseline_report_path", sa.Text(), nullable=True),
        sa.Column("baseline_report_sha256", sa.String(64), nullable=True),
        _when(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_models")),
        sa.UniqueConstraint("name", name=op.f("uq_base_models_name")),
    )
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(63), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        _when(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        _when(),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        *_tenant_columns("api_keys"),
        _one_of("api_keys", "role", ("customer", "reviewer", "operator")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
    )
    op.create_index(op.f("ix_api_keys_tenant_id"), "api_keys", ["tenant_id"])

    op.create_table(
        "datasets",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("artifact_path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("image_count", sa.Integer(), nullable=True),
        sa.Column("contamination_ratio", sa.Double(), nullable=True),
        _when(),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        *_tenant_columns("datasets"),
        _one_of("datasets", "status", ("received", "flagged", "accepted", "rejected")),
        sa.CheckConstraint("contamination_ratio >= 0 AND contamination_ratio <= 1",
                           name=op.f("ck_datasets_contamination_ratio")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint("id", "tenant_id", name=op.f("uq_datasets_id_tenant_id")),
    )
    op.create_index(op.f("ix_datasets_content_sha256"), "datasets", ["content_sha256"])
    op.create_index(op.f("ix_datasets_tenant_id"), "datasets", ["tenant_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("base_model_id", sa.String(32), nullable=False),
        sa.Column("dataset_id", sa.String(32), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(64), nullable=True),
        sa.Column("progress", sa.Double(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _when(),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        *_tenant_columns("jobs"),
        _one_of("jobs", "method", ("lora", "dreambooth")),
        _one_of("jobs", "status",
                ("queued", "training", "auditing", "review", "failed", "released", "withheld", "cancelled")),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_jobs_attempts")),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name=op.f("ck_jobs_progress")),
        sa.ForeignKeyConstraint(["base_model_id"], ["base_models.id"], name=op.f("fk_jobs_base_model_id_base_models")),
        _same_tenant_fk("jobs", "dataset_id", "datasets"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("id", "tenant_id", name=op.f("uq_jobs_id_tenant_id")),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name=op.f("uq_jobs_tenant_id_idempotency_key")),
    )
    op.create_index(op.f("ix_jobs_status"), "jobs", ["status"])
    op.create_index(op.f("ix_jobs_tenant_id"), "jobs", ["tenant_id"])

    op.create_table(
        "artifacts",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        _when(),
        *_tenant_columns("artifacts"),
        _same_tenant_fk("artifacts", "job_id", "jobs"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artifacts")),
        sa.UniqueConstraint("job_id", name=op.f("uq_artifacts_job_id")),
    )
    op.create_index(op.f("ix_artifacts_tenant_id"), "artifacts", ["tenant_id"])

    op.create_table(
        "audits",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("report_path", sa.Text(), nullable=True),
        sa.Column("report_sha256", sa.String(64), nullable=True),
        sa.Column("html_path", sa.Text(), nullable=True),
        sa.Column("decision", sa.String(8), nullable=True),
        sa.Column("reasons", sa.JSON(), nullable=True),
        _when(),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        *_tenant_columns("audits"),
        _one_of("audits", "decision", ("pass", "flag", "block")),
        _same_tenant_fk("audits", "job_id", "jobs"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audits")),
        sa.UniqueConstraint("id", "tenant_id", name=op.f("uq_audits_id_tenant_id")),
    )
    op.create_index(op.f("ix_audits_job_id"), "audits", ["job_id"])
    op.create_index(op.f("ix_audits_tenant_id"), "audits", ["tenant_id"])

    op.create_table(
        "reviews",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("reviewer_key_id", sa.String(16), nullable=False),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        _when(),
        *_tenant_columns("reviews"),
        _one_of("reviews", "decision", ("approve", "reject")),
        _same_tenant_fk("reviews", "job_id", "jobs"),
        sa.ForeignKeyConstraint(["reviewer_key_id"], ["api_keys.id"], name=op.f("fk_reviews_reviewer_key_id_api_keys")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
        sa.UniqueConstraint("job_id", name=op.f("uq_reviews_job_id")),
    )
    op.create_index(op.f("ix_reviews_tenant_id"), "reviews", ["tenant_id"])

    op.create_table(
        "verdicts",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("audit_id", sa.String(32), nullable=False),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("policy_name", sa.String(200), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        _when(),
        *_tenant_columns("verdicts"),
        _one_of("verdicts", "decision", ("pass", "flag", "block")),
        _same_tenant_fk("verdicts", "job_id", "jobs"),
        _same_tenant_fk("verdicts", "audit_id", "audits"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verdicts")),
        sa.UniqueConstraint("job_id", name=op.f("uq_verdicts_job_id")),
    )
    op.create_index(op.f("ix_verdicts_tenant_id"), "verdicts", ["tenant_id"])

    _create_append_only_guards()


def _create_append_only_guards() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"""
            CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '{APPEND_ONLY} (% refused)', TG_OP;
            END $$""")
        op.execute("CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log "
                   "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()")
        op.execute("CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
                   "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()")
    else:  # SQLite
        for event in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER audit_log_no_{event.lower()} BEFORE {event} ON audit_log "
                       f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END")


def downgrade() -> None:
    for table in ("verdicts", "reviews", "audits", "artifacts", "jobs", "datasets", "api_keys", "tenants",
                  "base_models", "audit_log"):  # dependants first; indexes and triggers go with their table
        op.drop_table(table)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION audit_log_append_only()")
