"""The gate's tables (SQLAlchemy 2 declarative); the first Alembic migration creates exactly these.

Tenancy is enforced by the schema, not only by queries: every customer-owned row carries ``tenant_id``
(so each query can be scoped without joins), and references between customer-owned rows are composite
foreign keys on ``(id, tenant_id)``, so a job cannot point at another tenant's dataset, nor an audit,
verdict, review or artifact at another tenant's job.

Idempotency under Celery's ``acks_late`` (a task may run twice) rests on unique constraints: one verdict,
one review and one artifact per job; a job's ``(tenant_id, idempotency_key)`` is unique so a client that
retries its POST gets the same job. Audits may repeat (a retried audit task); only one becomes the verdict.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from auditing.verdict import DECISIONS

from .clock import db_time

ROLES = ("customer", "reviewer", "operator")
SYSTEM_ROLE = "system"  # workers and the command line, in the audit log
PLATFORM_TENANT = "platform"  # the store tenant of files no customer owns (base models' baselines)
METHODS = ("lora", "dreambooth")
ARTIFACT_KINDS = ("lora", "unet")  # a diffusers LoRA file, or a full UNet state dict (DreamBooth)
REVIEW_DECISIONS = ("approve", "reject")
TENANT_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

# Job life cycle. ``failed`` means no verdict, hence nothing released (the gate fails closed); an
# operator may queue it again. ``released``, ``withheld`` and ``cancelled`` are final. A customer cancels a
# queued job at once and a training one at its next step (``gate.pipeline.cancel``); a cancelled job has no
# verdict, so nothing of it is released.
JOB_TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"training", "cancelled", "failed"}),
    "training": frozenset({"auditing", "queued", "cancelled", "failed"}),
    "auditing": frozenset({"released", "review", "withheld", "failed"}),
    "review": frozenset({"released", "withheld"}),
    "failed": frozenset({"queued"}),
    "released": frozenset(),
    "withheld": frozenset(),
    "cancelled": frozenset(),
}
# Hardening runs (operators, ``align`` queue). A worker lost mid-run puts it back to ``queued``; it resumes
# from its last checkpoint.
ALIGNMENT_TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "failed"}),
    "running": frozenset({"succeeded", "failed", "queued"}),
    "failed": frozenset({"queued"}),
    "succeeded": frozenset(),
}
# Dataset intake (``gate.pipeline.intake``, on a worker): ``received`` until the intake stage decides; ``flagged``
# waits for a reviewer (contamination between the flag and reject ratios); ``failed`` when the service could not
# scan it in ``max_attempts`` tries (the customer's data is not at fault). An accepted dataset is ``screening``
# while a base model's detector it was never scanned with looks at it (a job on that model asked for it).
DATASET_TRANSITIONS: dict[str, frozenset[str]] = {
    "received": frozenset({"accepted", "flagged", "rejected", "failed"}),
    "screening": frozenset({"accepted", "flagged", "rejected"}),
    "flagged": frozenset({"accepted", "rejected"}),
    "accepted": frozenset({"screening"}),
    "rejected": frozenset(),
    "failed": frozenset(),
}
# The one dataset status that trains: a flagged dataset waits until a reviewer accepts it.
TRAINABLE_DATASET = "accepted"
# A job in one of these may still train or audit: it holds a worker's scratch folder and a share of the queues.
ACTIVE_JOB_STATES = ("queued", "training", "auditing")
EVENT_KINDS = ("stage", "loss", "sample", "checkpoint", "verdict")  # a job's events (``JobEvent``)
WEBHOOK_STATES = ("pending", "delivered", "abandoned")  # a delivery owed to a webhook (``WebhookOutbox``)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def check_tenant_id(tenant_id: str) -> str:
    """A tenant id is a short slug: it appears in URLs and artifact paths, so nothing else is allowed."""
    if not isinstance(tenant_id, str) or not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise ValueError(f"tenant id must match {TENANT_ID_PATTERN.pattern} (lower-case letters, digits, '-', '_'; "
                         f"at most 63); got {tenant_id!r}")
    return tenant_id


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in and out on every backend (SQLite keeps no zone; naive values are refused)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def _one_of(column: str, values, name: str | None = None) -> CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=name or column)


def _tenant_fk(column: str, table: str) -> ForeignKeyConstraint:
    """``(column, tenant_id)`` references ``table(id, tenant_id)``: the referenced row is the same tenant's."""
    return ForeignKeyConstraint([column, "tenant_id"], [f"{table}.id", f"{table}.tenant_id"])


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict] = {datetime: UTCDateTime, dict[str, Any]: JSON, list[str]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TenantOwned:
    """Rows that belong to one customer; ``gate.auth.scoped`` filters on ``tenant_id``.

    The many-to-one relationships below (here and on the models) are declared so that the ORM inserts a
    parent before its children in one flush; the composite same-tenant keys share ``tenant_id``, hence
    ``overlaps``.
    """

    tenant_id: Mapped[str] = mapped_column(String(63), ForeignKey("tenants.id"), index=True)

    @declared_attr
    def tenant(cls) -> Mapped[Tenant]:
        return relationship(Tenant)


class ApiKey(TenantOwned, Base):
    """Only a hash of the secret is stored; ``id`` is the clear key id embedded in the key for lookup.

    Reviewer and operator keys belong to a tenant too (the platform's own), but are not scoped by it.
    """

    __tablename__ = "api_keys"
    __table_args__ = (_one_of("role", ROLES),)

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(200))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class BaseModel(Base):
    """A (hardened) base model customers fine-tune, shared by all tenants; the baseline audit report is the
    base model's own figures on the probe set that every job's audit is paired with."""

    __tablename__ = "base_models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    path: Mapped[str] = mapped_column(Text)  # a diffusers folder, or a single .safetensors checkpoint
    # How it is loaded (``auditing.models.loading.load_pipeline``): a single file's config folder, the weight
    # variant ("fp16"), a VAE folder in place of its own; weights_sha256 covers the files these select.
    config_path: Mapped[str | None] = mapped_column(Text)
    variant: Mapped[str | None] = mapped_column(String(32))
    vae_path: Mapped[str | None] = mapped_column(Text)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    # The store key (tenant PLATFORM_TENANT) and hash of the baseline last used for its current profile
    # (a ``Baseline`` row's), set by ``gate.pipeline.audit.ensure_baseline``; None until one exists.
    baseline_report_path: Mapped[str | None] = mapped_column(Text)
    baseline_report_sha256: Mapped[str | None] = mapped_column(String(64))
    # How its checkpoints are audited (``gate.pipeline.profile.AuditProfile`` as a dict).
    audit_profile: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Baseline(Base):
    """A base model's baseline report for one audit profile as resolved on one kind of device, in the store
    under ``PLATFORM_TENANT``: the first host to audit it inserts the row, every other host fetches that report
    (unique per base model and profile hash, so two hosts racing keep one)."""

    __tablename__ = "baselines"
    __table_args__ = (UniqueConstraint("base_model_id", "profile_sha256"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    base_model_id: Mapped[str] = mapped_column(String(32), ForeignKey("base_models.id"))
    profile_sha256: Mapped[str] = mapped_column(String(64))  # ``AuditProfile.sha256(device)``
    report_key: Mapped[str] = mapped_column(Text)  # a store key of PLATFORM_TENANT
    report_sha256: Mapped[str] = mapped_column(String(64))  # ``auditing.audit.report_sha256`` of the report
    html_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(TenantOwned, Base):
    __tablename__ = "datasets"
    __table_args__ = (
        UniqueConstraint("id", "tenant_id"),
        _one_of("status", DATASET_TRANSITIONS),
        CheckConstraint("contamination_ratio >= 0 AND contamination_ratio <= 1", name="contamination_ratio"),
        CheckConstraint("attempts >= 0", name="attempts"),
    )
    TRANSITIONS: ClassVar[dict[str, frozenset[str]]] = DATASET_TRANSITIONS

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="received")
    content_sha256: Mapped[str] = mapped_column(String(64), index=True)
    artifact_path: Mapped[str] = mapped_column(Text)  # the upload's store key
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    image_count: Mapped[int | None]
    contamination_ratio: Mapped[float | None]  # the strictest detector's
    # The re-encoded caption folder training reads, as a stored zip (hosts share nothing but the store).
    prepared_path: Mapped[str | None] = mapped_column(Text)
    # The intake's figures: layout, images, and per detector its info, unsafe images, ratio and flagged files.
    intake: Mapped[dict[str, Any] | None]
    # The intake stage's lease, tries and dispatch, as a job's (``gate.pipeline.leases``).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    dispatched_at: Mapped[datetime | None] = mapped_column(default=db_time())
    error: Mapped[str | None] = mapped_column(Text)  # the service's last fault in its intake, if any
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Job(TenantOwned, Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("id", "tenant_id"),
        UniqueConstraint("tenant_id", "idempotency_key"),
        _tenant_fk("dataset_id", "datasets"),
        _one_of("method", METHODS),
        _one_of("status", JOB_TRANSITIONS),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
        CheckConstraint("attempts >= 0", name="attempts"),
    )
    TRANSITIONS: ClassVar[dict[str, frozenset[str]]] = JOB_TRANSITIONS

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    base_model_id: Mapped[str] = mapped_column(String(32), ForeignKey("base_models.id"))
    dataset_id: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(16))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    stage: Mapped[str | None] = mapped_column(String(64))  # finer than status, e.g. "rendering probes"
    progress: Mapped[float] = mapped_column(default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    # When its latest message was owed to the queues (with the state change that called for it): the reaper
    # dispatches again a job that waits past dispatch_grace_seconds for its stage (gate.pipeline.leases).
    dispatched_at: Mapped[datetime | None] = mapped_column(default=db_time())
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # sha256 of the creating request's canonical parameters: a replay of its idempotency key must match it.
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    # Set by the customer's cancel of a training job; the worker stops at its next progress report.
    cancel_requested_at: Mapped[datetime | None]
    webhook_url: Mapped[str | None] = mapped_column(Text)  # where its stage and verdict events are posted
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]

    base_model: Mapped[BaseModel] = relationship()
    dataset: Mapped[Dataset] = relationship(overlaps="tenant")


class Artifact(TenantOwned, Base):
    """The checkpoint (adapter) a job produced; at most one per job."""

    __tablename__ = "artifacts"
    __table_args__ = (_tenant_fk("job_id", "jobs"), _one_of("kind", ARTIFACT_KINDS))

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(String(32), unique=True)
    kind: Mapped[str] = mapped_column(String(8))
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # an ArtifactStore key
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(overlaps="tenant")


class Audit(TenantOwned, Base):
    """One run of the auditor on a job's checkpoint; ``decision`` is the report's verdict."""

    __tablename__ = "audits"
    __table_args__ = (
        UniqueConstraint("id", "tenant_id"),
        _tenant_fk("job_id", "jobs"),
        _one_of("decision", DECISIONS),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))  # the checkpoint it audited
    report_path: Mapped[str | None] = mapped_column(Text)
    report_sha256: Mapped[str | None] = mapped_column(String(64))
    html_path: Mapped[str | None] = mapped_column(Text)
    decision: Mapped[str | None] = mapped_column(String(8))
    reasons: Mapped[list[str] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship(overlaps="tenant")


class Verdict(TenantOwned, Base):
    """The gate's decision on a job: exactly one per job, taken from one audit."""

    __tablename__ = "verdicts"
    __table_args__ = (
        _tenant_fk("job_id", "jobs"),
        _tenant_fk("audit_id", "audits"),
        _one_of("decision", DECISIONS),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(String(32), unique=True)
    audit_id: Mapped[str] = mapped_column(String(32))
    decision: Mapped[str] = mapped_column(String(8))
    reasons: Mapped[list[str]] = mapped_column(default=list)
    policy_name: Mapped[str] = mapped_column(String(200))
    policy_version: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(overlaps="tenant,audit")
    audit: Mapped[Audit] = relationship(overlaps="tenant,job")


class Review(TenantOwned, Base):
    """A reviewer's decision on a flagged job: one per job, and a reason is required."""

    __tablename__ = "reviews"
    __table_args__ = (_tenant_fk("job_id", "jobs"), _one_of("decision", REVIEW_DECISIONS))

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(String(32), unique=True)
    reviewer_key_id: Mapped[str] = mapped_column(String(16), ForeignKey("api_keys.id"))
    decision: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(overlaps="tenant")
    reviewer_key: Mapped[ApiKey] = relationship()


class AlignmentRun(Base):
    """An operator's ResAlign hardening run (``ftgate align`` on a worker); platform-wide, no tenant."""

    __tablename__ = "alignment_runs"
    __table_args__ = (_one_of("status", ALIGNMENT_TRANSITIONS), CheckConstraint("attempts >= 0", name="attempts"))
    TRANSITIONS: ClassVar[dict[str, frozenset[str]]] = ALIGNMENT_TRANSITIONS

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[float] = mapped_column(default=0.0)
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    dispatched_at: Mapped[datetime | None] = mapped_column(default=db_time())  # as Job.dispatched_at
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # starts, as Job.attempts
    output_path: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class JobEvent(TenantOwned, Base):
    """What a customer may follow of a running job (``gate.pipeline.events``): append-only, numbered 1, 2, ...
    per job; the unique ``(job_id, seq)`` makes two writers racing for a number retry rather than interleave."""

    __tablename__ = "job_events"
    __table_args__ = (_tenant_fk("job_id", "jobs"), UniqueConstraint("job_id", "seq"), _one_of("kind", EVENT_KINDS))

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)  # what the customer reads
    artifact_key: Mapped[str | None] = mapped_column(Text)  # a stored file the event shows (a sample grid)


class WebhookSecret(Base):
    """A tenant's webhook signing key (HMAC-SHA256, ``gate.webhooks``). Kept in clear, since signing needs it;
    the API shows it once, when it is made."""

    __tablename__ = "webhook_secrets"

    tenant_id: Mapped[str] = mapped_column(String(63), ForeignKey("tenants.id"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    url: Mapped[str | None] = mapped_column(Text)  # the tenant's default target, for jobs without a webhook_url


class WebhookOutbox(TenantOwned, Base):
    """A job event owed to a webhook (``gate.pipeline.webhooks``), written in its event's transaction so that
    no process's exit loses it: ``pending`` until a 2xx answer (``delivered``) or the last attempt
    (``abandoned``). ``attempts`` counts the attempts claimed so far; ``next_attempt_at`` (database clock) is
    when the next is due, or, while one is under way, when its claim lapses."""

    __tablename__ = "webhook_outbox"
    __table_args__ = (_tenant_fk("job_id", "jobs"), UniqueConstraint("job_id", "event_seq"),
                      _one_of("state", WEBHOOK_STATES), CheckConstraint("attempts >= 0", name="attempts"),
                      Index(None, "state", "next_attempt_at"))

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32))
    event_seq: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=db_time())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(TenantOwned, Base):
    """One attempt to post a job event to its webhook: the answer's status, or why there was none."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (_tenant_fk("job_id", "jobs"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    event_seq: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditLogEntry(Base):
    """One state change. Append-only (see ``gate.storage.audit_log``); no foreign keys, so entries outlive
    whatever they describe and never block a delete elsewhere."""

    __tablename__ = "audit_log"
    __table_args__ = (
        _one_of("actor_role", (*ROLES, SYSTEM_ROLE)),
        Index(None, "tenant_id", "at"),
        Index(None, "entity_type", "entity_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor_key_id: Mapped[str | None] = mapped_column(String(16))
    actor_role: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[str | None] = mapped_column(String(63))
    entity_type: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any] | None]


class WebSession(Base):
    """A reviewer-page session (``gate.web.sessions``). ``id`` is the sha256 of the cookie's random value, so a
    copy of the database signs nobody in; ``key_id`` is None until sign-in (the row then holds only the sign-in
    form's CSRF token). Deleting the row ends the session, whoever holds the cookie."""

    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str | None] = mapped_column(String(16), ForeignKey("api_keys.id"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
