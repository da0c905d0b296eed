"""API keys (stored hashed, compared in constant time, revocable), roles and tenant scoping; ``ftgate keys``."""

from __future__ import annotations

import argparse

import pytest
from sqlalchemy import select, text

from gate import auth, keys_cli
from gate.auth import (
    Forbidden,
    NotFound,
    Principal,
    authenticate,
    create_key,
    ensure_tenant,
    get_for_principal,
    require_role,
    revoke_key,
    scoped,
)
from gate.storage import cli as storage_cli
from gate.storage.audit_log import SYSTEM
from gate.storage.db import make_engine, session_factory
from gate.storage.models import ApiKey, AuditLogEntry, BaseModel, Dataset, Job


def _issue(sessions, tenant="acme", role="customer"):
    with sessions.begin() as session:
        ensure_tenant(session, tenant, SYSTEM)
        return create_key(session, tenant, role, SYSTEM, name=f"{tenant} {role}")


def _job(session, tenant: str) -> Job:
    model = session.scalars(select(BaseModel)).first() or BaseModel(name="hardened", path="/m", weights_sha256="a" * 64)
    dataset = Dataset(tenant_id=tenant, name="cats", content_sha256="b" * 64, artifact_path="k", size_bytes=1)
    job = Job(tenant_id=tenant, base_model=model, dataset=dataset, method="lora", hyperparameters={})
    session.add(job)
    return job


def test_key_is_stored_only_as_a_hash(tmp_path, engine, sessions):
    issued = _issue(sessions)
    assert issued.key.startswith(f"ftg_{issued.key_id}_")
    secret = issued.key.removeprefix(f"ftg_{issued.key_id}_")
    assert len(secret) == 43
    assert issued.key not in repr(issued)
    with engine.connect() as connection:
        dump = "\n".join(str(row) for table in ("tenants", "api_keys", "audit_log")
                         for row in connection.execute(text(f"SELECT * FROM {table}")))
    assert issued.key_id in dump and secret not in dump
    on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("ftgate.db*"))  # database, WAL and shm files
    assert secret.encode() not in on_disk


def test_authenticate_accepts_the_key_and_nothing_like_it(sessions, monkeypatch):
    issued = _issue(sessions, role="reviewer")
    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    with sessions() as session:
        assert authenticate(session, issued.key) == Principal(issued.key_id, "acme", "reviewer")
        assert compared  # the secret's hash is compared in constant time
        wrong = issued.key[:-1] + ("A" if issued.key[-1] != "A" else "B")
        other_id = issued.key.replace(issued.key_id, "f" * 12)
        for presented in (wrong, other_id, issued.key + "x", issued.key[4:], "", None, f"Bearer {issued.key}"):
            assert authenticate(session, presented) is None, presented


def test_revoked_key_is_rejected_and_revocation_is_logged(sessions):
    issued = _issue(sessions)
    with sessions.begin() as session:
        revoke_key(session, issued.key_id, SYSTEM, reason="leaked")
        revoke_key(session, issued.key_id, SYSTEM)  # idempotent
    with sessions() as session:
        assert authenticate(session, issued.key) is None
        log = session.scalars(select(AuditLogEntry).where(AuditLogEntry.entity_id == issued.key_id)).all()
        assert [(e.action, e.reason) for e in log] == [("created", None), ("revoked", "leaked")]
        with pytest.raises(NotFound):
            revoke_key(session, "f" * 12, SYSTEM)


def test_bad_role_or_tenant_id_is_refused(sessions):
    with sessions() as session:
        with pytest.raises(ValueError, match=r"role must be one of \['customer', 'reviewer', 'operator'\]"):
            create_key(session, "acme", "admin", SYSTEM)
        with pytest.raises(ValueError, match="tenant id must match"):
            ensure_tenant(session, "../acme", SYSTEM)


def test_require_role():
    customer = Principal("k" * 12, "acme", "customer")
    require_role(customer, "customer", "operator")
    with pytest.raises(Forbidden, match=r"role 'customer' may not do this; it needs one of \['reviewer'\]"):
        require_role(customer, "reviewer")


def test_customers_see_only_their_tenant_and_staff_see_all(sessions):
    acme, globex = _issue(sessions, "acme"), _issue(sessions, "globex")
    reviewer = _issue(sessions, "platform", "reviewer")
    with sessions.begin() as session:
        acme_job, globex_job = _job(session, "acme"), _job(session, "globex")
    with sessions() as session:
        as_acme = authenticate(session, acme.key)
        as_reviewer = authenticate(session, reviewer.key)
        assert session.scalars(scoped(select(Job), Job, as_acme)).all() == [session.get(Job, acme_job.id)]
        assert {j.id for j in session.scalars(scoped(select(Job), Job, as_reviewer))} == {acme_job.id, globex_job.id}
        assert get_for_principal(session, Job, acme_job.id, as_acme).id == acme_job.id
        assert get_for_principal(session, Job, globex_job.id, as_reviewer).id == globex_job.id
        with pytest.raises(NotFound) as other_tenant:
            get_for_principal(session, Job, globex_job.id, as_acme)
        with pytest.raises(NotFound) as missing:
            get_for_principal(session, Job, "0" * 32, as_acme)
        assert str(other_tenant.value) == str(missing.value).replace("0" * 32, globex_job.id)  # indistinguishable
        assert authenticate(session, globex.key).tenant_id == "globex"
        with pytest.raises(TypeError, match="not owned by a tenant"):
            scoped(select(BaseModel), BaseModel, as_acme)


def _ftgate(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="ftgate")
    sub = parser.add_subparsers(dest="command", required=True)
    keys_cli.register(sub)
    storage_cli.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_keys_cli_prints_the_key_once_and_never_lists_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FTGATE_STATE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="run `ftgate db upgrade`"):
        _ftgate("keys", "create", "--tenant", "acme", "--role", "customer")
    assert _ftgate("db", "upgrade") == 0
    assert _ftgate("db", "current") == 0
    capsys.readouterr()
    assert _ftgate("keys", "create", "--tenant", "acme", "--role", "customer", "--name", "ci") == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("ftg_") and "\n" not in key
    sessions = session_factory(make_engine(f"sqlite:///{tmp_path}/ftgate.db"))
    with sessions() as session:
        principal = authenticate(session, key)
        assert (principal.tenant_id, principal.role) == ("acme", "customer")
    assert _ftgate("keys", "list") == 0
    listing = capsys.readouterr().out
    secret = key.removeprefix(f"ftg_{principal.key_id}_")
    assert principal.key_id in listing and "acme" in listing and secret not in listing
    assert _ftgate("keys", "revoke", principal.key_id, "--reason", "rotated") == 0
    with sessions() as session:
        assert authenticate(session, key) is None
        assert session.get(ApiKey, principal.key_id).revoked_at is not None
    assert _ftgate("keys", "revoke", "0" * 12) == 2
    assert "no API key" in capsys.readouterr().err
