"""Storage on SQLite and PostgreSQL: migrations, uniqueness that makes tasks idempotent, tenant-consistent
references, the append-only audit log, status transitions; and the artifact store."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import CheckConstraint, delete, inspect, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError

from gate.storage.artifacts import ArtifactStore, ArtifactTooLarge
from gate.storage.audit_log import SYSTEM, Actor, AppendOnlyError, IllegalTransition, StaleState, record, transition
from gate.storage.db import (
    SchemaNotCurrent,
    alembic_config,
    current_revision,
    head_revision,
    make_engine,
    require_current,
    session_factory,
    upgrade,
)
from gate.storage.models import Artifact, Audit, AuditLogEntry, Base, BaseModel, Dataset, Job, Tenant, Verdict
from gate.storage.testing import postgres_schema, postgres_unavailable


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ftgate.db"
        return
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    with postgres_schema() as url:
        yield url


def _job(session, tenant="acme", **fields) -> Job:
    """A tenant (if new), a dataset and a queued job, committed."""
    if session.get(Tenant, tenant) is None:
        session.add(Tenant(id=tenant, name=tenant))
    model = session.scalars(select(BaseModel)).first() or BaseModel(name="hardened", path="/m", weights_sha256="a" * 64)
    dataset = Dataset(tenant_id=tenant, name="cats", content_sha256="b" * 64, artifact_path="k", size_bytes=1)
    job = Job(tenant_id=tenant, base_model=model, dataset=dataset, method="lora", hyperparameters={"rank": 4},
              **fields)
    session.add(job)
    session.commit()
    return job


def test_migrations_create_every_table_and_reach_head(engine):
    assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    assert current_revision(engine) == head_revision() == "0013"
    with engine.connect() as connection:  # the migration and the models describe the same schema
        assert compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                Base.metadata) == []
    require_current(engine)
    assert upgrade(engine) == head_revision()  # idempotent


def test_migration_has_the_models_check_constraints(engine):
    """compare_metadata ignores CHECK constraints (allowed statuses, roles): compare them here."""
    inspector = inspect(engine)
    for table in Base.metadata.sorted_tables:
        declared = {c.name: str(c.sqltext) for c in table.constraints if isinstance(c, CheckConstraint)}
        reflected = {c["name"]: c["sqltext"] for c in inspector.get_check_constraints(table.name)}
        assert set(reflected) == set(declared), table.name
        if engine.dialect.name == "sqlite":  # PostgreSQL rewrites the expressions it stores
            assert reflected == declared, table.name


def test_migration_downgrades_to_empty_and_up_again(engine):
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    with pytest.raises(SchemaNotCurrent, match="run `ftgate db upgrade`"):
        require_current(engine)
    upgrade(engine)
    require_current(engine)


def test_migration_0003_keeps_base_models_as_plain_folders(database_url):
    """A base model registered before 0003 keeps its row, with no config, variant or VAE: a plain folder, loaded
    and hashed as before; the new columns take a registration's values."""
    engine = make_engine(database_url)
    try:
        upgrade(engine, "0002")
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO base_models (id, name, path, weights_sha256, created_at) "
                                    "VALUES ('b1', 'old', '/m', :sha, CURRENT_TIMESTAMP)"), {"sha": "a" * 64})
        assert upgrade(engine, "0003") == "0003"
        with engine.connect() as connection:
            row = connection.execute(text("SELECT name, config_path, variant, vae_path FROM base_models")).one()
        assert tuple(row) == ("old", None, None, None)
        with session_factory(engine)() as session:
            session.add(BaseModel(name="fp16", path="/m2", variant="fp16", vae_path="/vae", weights_sha256="b" * 64))
            session.commit()
            assert session.scalars(select(BaseModel.variant).order_by(BaseModel.name)).all() == ["fp16", None]
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), "0002")
        assert "variant" not in {c["name"] for c in inspect(engine).get_columns("base_models")}
    finally:
        engine.dispose()


def test_one_verdict_and_one_artifact_per_job(sessions):
    with sessions() as session:
        job = _job(session)
        audits = [Audit(tenant_id="acme", job=job, decision="pass") for _ in range(2)]  # a retried audit task
        session.add_all(audits)
        session.add(Verdict(tenant_id="acme", job=job, audit=audits[0], decision="pass", policy_name="default",
                            policy_version=1))
        session.add(Artifact(tenant_id="acme", job=job, kind="lora", sha256="c" * 64, path="k", size_bytes=1))
        session.commit()
        session.add(Verdict(tenant_id="acme", job=job, audit=audits[1], decision="block", policy_name="default",
                            policy_version=1))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        session.add(Artifact(tenant_id="acme", job_id=job.id, kind="lora", sha256="d" * 64, path="k2", size_bytes=1))
        with pytest.raises(IntegrityError):
            session.commit()


def test_idempotency_key_is_unique_per_tenant(sessions):
    with sessions() as session:
        _job(session, idempotency_key="post-1")
        _job(session, tenant="globex", idempotency_key="post-1")  # another tenant may use the same key
        with pytest.raises(IntegrityError):
            _job(session, idempotency_key="post-1")


def test_rows_cannot_reference_another_tenants_rows(sessions):
    with sessions() as session:
        job = _job(session, tenant="acme")
        session.add(Tenant(id="globex", name="globex"))
        session.commit()
        session.add(Job(tenant_id="globex", base_model_id=job.base_model_id, dataset_id=job.dataset_id,
                        method="lora", hyperparameters={}))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        session.add(Audit(tenant_id="globex", job_id=job.id))
        with pytest.raises(IntegrityError):
            session.commit()


def test_timestamps_are_aware_utc(sessions):
    lease = datetime(2030, 1, 1, 12, tzinfo=UTC) + timedelta(minutes=5)
    with sessions() as session:
        job_id = _job(session, lease_expires_at=lease).id
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.lease_expires_at == lease and job.lease_expires_at.tzinfo is not None
        assert job.created_at.tzinfo is not None
        with pytest.raises(StatementError, match="naive datetime"):
            job.lease_expires_at = datetime(2030, 1, 1)
            session.commit()


def test_transition_is_compare_and_set_and_logged(sessions):
    worker = Actor("system")
    with sessions() as first, sessions() as second:
        job = _job(first)
        duplicate = second.get(Job, job.id)  # a second delivery of the same task reads the same row
        until = datetime.now(UTC) + timedelta(minutes=10)
        transition(first, job, "training", worker, changes={"worker": "w1", "lease_expires_at": until,
                                                            "attempts": Job.attempts + 1})
        first.commit()
        with pytest.raises(StaleState, match="no longer queued"):
            transition(second, duplicate, "training", worker, changes={"worker": "w2"})
        second.rollback()
    with sessions() as session:
        job = session.get(Job, job.id)
        assert (job.status, job.worker, job.attempts) == ("training", "w1", 1)
        entries = session.scalars(select(AuditLogEntry).where(AuditLogEntry.entity_id == job.id)).all()
        assert [(e.entity_type, e.action, e.from_state, e.to_state, e.actor_role, e.tenant_id) for e in entries] \
            == [("jobs", "status", "queued", "training", "system", "acme")]
        with pytest.raises(IllegalTransition, match="training -> released is not allowed"):
            transition(session, job, "released", SYSTEM)


def test_audit_log_refuses_changes_through_the_orm(sessions):
    with sessions() as session:
        job = _job(session)
        entry = record(session, SYSTEM, job, "note", reason="first", detail={"k": 1})
        session.commit()
        entry.reason = "rewritten"
        with pytest.raises(AppendOnlyError):
            session.commit()
        session.rollback()
        session.delete(entry)
        with pytest.raises(AppendOnlyError):
            session.commit()
        session.rollback()
        for statement in (update(AuditLogEntry).values(reason="x"), delete(AuditLogEntry)):
            with pytest.raises(AppendOnlyError):
                session.execute(statement)
    with sessions() as session:
        assert session.scalars(select(AuditLogEntry.reason)).all() == ["first"]


def test_audit_log_refuses_changes_in_sql(engine, sessions):
    with sessions() as session:
        record(session, SYSTEM, _job(session), "note", reason="first")
        session.commit()
    statements = ["UPDATE audit_log SET reason = 'rewritten'", "DELETE FROM audit_log"]
    if engine.dialect.name == "postgresql":
        statements.append("TRUNCATE audit_log")
    for statement in statements:
        with pytest.raises(DBAPIError, match="audit_log is append-only"), engine.begin() as connection:
            connection.execute(text(statement))
    with engine.connect() as connection:
        assert connection.execute(text("SELECT reason FROM audit_log")).scalars().all() == ["first"]


def test_sqlite_connections_enforce_foreign_keys_and_use_wal(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/deep/er/ftgate.db")  # folders are created
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


# The artifact store


class _Failing:
    """A client that sends some bytes, then drops the connection."""

    def __init__(self):
        self.chunks = [b"part"]

    def read(self, _size: int) -> bytes:
        if not self.chunks:
            raise ConnectionResetError("client went away")
        return self.chunks.pop()


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_artifacts_are_content_addressed_and_deduplicated(tmp_path):
    store = ArtifactStore(tmp_path)
    first = store.put("acme", io.BytesIO(b"weights"), suffix=".safetensors")
    again = store.put("acme", io.BytesIO(b"weights"), suffix=".safetensors")
    assert first == again
    assert first.key == f"tenants/acme/sha256/{first.sha256[:2]}/{first.sha256}.safetensors"
    assert store.path("acme", first.key).read_bytes() == b"weights"
    assert store.exists("acme", first.sha256, ".safetensors") and not store.exists("acme", first.sha256)
    assert _files(tmp_path) == [first.key]  # one copy, no temporary left behind
    assert store.verify("acme", first.key)
    store.path("acme", first.key).write_bytes(b"tampered")
    assert not store.verify("acme", first.key)


def test_failed_or_oversized_put_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(ArtifactTooLarge, match="limit of 10 bytes"):
        store.put("acme", io.BytesIO(b"x" * 11), max_bytes=10)
    with pytest.raises(ConnectionResetError):
        store.put("acme", _Failing())
    assert _files(tmp_path) == []
    assert store.put("acme", io.BytesIO(b"x" * 10), max_bytes=10).size_bytes == 10


def test_tenants_cannot_reach_each_others_artifacts(tmp_path):
    store = ArtifactStore(tmp_path)
    theirs = store.put("globex", io.BytesIO(b"secret weights"))
    with pytest.raises(ValueError, match="not an artifact key of tenant 'acme'"):
        store.path("acme", theirs.key)
    assert not store.exists("acme", theirs.sha256)
    sneaky = f"tenants/acme/sha256/../../globex/sha256/{theirs.sha256[:2]}/{theirs.sha256}"
    with pytest.raises(ValueError, match="not an artifact key"):
        store.path("acme", sneaky)


@pytest.mark.parametrize("tenant", ["../globex", "..", "a/b", "", "Acme", ".hidden", "a" * 64])
def test_tenant_ids_that_could_escape_the_prefix_are_refused(tmp_path, tenant):
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError, match="tenant id must match"):
        store.put(tenant, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="tenant id must match"):
        store.key(tenant, "0" * 64)
    assert _files(tmp_path) == []


@pytest.mark.parametrize("suffix", ["/../x", ".tar/..", "safetensors", ".EXE"])
def test_bad_suffixes_are_refused(tmp_path, suffix):
    with pytest.raises(ValueError, match="suffix must match"):
        ArtifactStore(tmp_path).put("acme", io.BytesIO(b"x"), suffix=suffix)


def test_the_sweep_removes_old_files_no_row_names_and_nothing_else(sessions, tmp_path):
    """What a worker killed between storing and committing leaves: an old unreferenced checkpoint and an old
    temporary file go; checkpoints and reports rows name, and fresh files whose rows may be about to commit,
    stay; bytes stored again count as fresh."""
    import os
    import time

    from gate.storage.sweep import GRACE_S, Swept, sweep

    store = ArtifactStore(tmp_path / "store")
    put = {name: store.put("acme", io.BytesIO(name.encode()), suffix=suffix)
           for name, suffix in (("named", ".safetensors"), ("report", ".json"), ("orphan", ".safetensors"),
                                ("fresh", ".safetensors"), ("again", ".safetensors"))}
    partial = store.root / "tenants" / "acme" / "tmp" / "put-x.partial"
    partial.write_bytes(b"cut off")
    old = time.time() - GRACE_S - 60
    for path in [*(store.root / p.key for name, p in put.items() if name != "fresh"), partial]:
        os.utime(path, (old, old))
    store.put("acme", io.BytesIO(b"again"), suffix=".safetensors")  # a job produced the same checkpoint again
    with sessions() as session:
        job = _job(session)
        session.add(Artifact(tenant_id="acme", job=job, kind="lora", sha256=put["named"].sha256,
                             path=put["named"].key, size_bytes=1))
        session.add(Audit(tenant_id="acme", job=job, decision="pass", report_path=put["report"].key))
        session.commit()
    swept = sweep(store, sessions)
    assert (swept.unreferenced, swept.partial) == (1, 1)
    left = {name for name, p in put.items() if (store.root / p.key).is_file()}
    assert left == {"named", "report", "fresh", "again"} and not partial.exists()
    assert sweep(store, sessions) == Swept(0, 0)
