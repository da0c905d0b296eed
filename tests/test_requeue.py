"""Queueing a failed job again (``gate.service.jobs.requeue_job``): an operator's act with a reason, from a clean
state (no checkpoint row, no resumable state, attempts from zero); anything but a failed job is refused."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from test_api import Env
from test_api_results import add_artifact, make_job

from gate.auth import Forbidden, authenticate
from gate.pipeline.fairness import HELD_STAGE
from gate.service.errors import ApiError
from gate.service.jobs import requeue_job
from gate.storage.models import Artifact, AuditLogEntry, Job


@pytest.fixture
def env(tmp_path, migrated) -> Env:
    return Env(tmp_path, migrated)


def principal(env: Env, session, who: str):
    return authenticate(session, env.keys[who].key)


def test_a_failed_job_is_queued_again_from_a_clean_state(env):
    job_id = make_job(env, "failed")
    add_artifact(env, job_id, b"the failed attempt's weights")
    state = env.settings.jobs_dir / job_id / "training-state"
    state.mkdir(parents=True)
    (state / "optimizer.safetensors").write_bytes(b"resumable")
    with env.sessions() as s:
        job = s.get(Job, job_id)
        job.attempts, job.error = 3, "gave up after 3 attempts"
        s.commit()
        requeue_job(s, principal(env, s, "op"), job_id, {"reason": "the GPU host was repaired"}, env.settings.jobs_dir)
    with env.sessions() as s:
        job = s.get(Job, job_id)
        assert (job.status, job.attempts, job.error, job.finished_at, job.worker) == ("queued", 0, None, None, None)
        assert (job.dispatched_at, job.stage) == (None, HELD_STAGE)  # held until the caller's fair dispatch sends it
        assert s.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []
        last = s.scalars(select(AuditLogEntry).where(AuditLogEntry.entity_id == job_id)
                         .order_by(AuditLogEntry.id.desc())).first()
    assert (last.from_state, last.to_state, last.actor_role, last.reason) == \
        ("failed", "queued", "operator", "the GPU host was repaired")
    assert not (env.settings.jobs_dir / job_id).exists()


@pytest.mark.parametrize("state", ["queued", "training", "released", "withheld", "cancelled"])
def test_only_a_failed_job_is_queued_again(env, state):
    job_id = make_job(env, state)
    with env.sessions() as s, pytest.raises(ApiError) as refused:
        requeue_job(s, principal(env, s, "op"), job_id, {"reason": "try again"}, env.settings.jobs_dir)
    assert (refused.value.status, refused.value.reason) == (409, "not_failed")


def test_requeue_needs_an_operator_and_a_reason(env):
    job_id = make_job(env, "failed")
    with env.sessions() as s:
        for who in ("a", "rev"):
            with pytest.raises(Forbidden):
                requeue_job(s, principal(env, s, who), job_id, {"reason": "mine"}, env.settings.jobs_dir)
        with pytest.raises(ApiError) as refused:
            requeue_job(s, principal(env, s, "op"), job_id, {"reason": " "}, env.settings.jobs_dir)
        assert refused.value.extra["field"] == "reason"
        with pytest.raises(ApiError) as missing:
            requeue_job(s, principal(env, s, "op"), "0" * 32, {"reason": "x"}, env.settings.jobs_dir)
        assert missing.value.status == 404
    with env.sessions() as s:
        assert s.get(Job, job_id).status == "failed"


def test_an_audit_stands_only_for_the_checkpoint_it_examined(env):
    """After a requeue the retrained checkpoint is audited anew: the job's finished audit is the one of the
    artifact it has now, and none while it has none (``gate.pipeline.audit.finished_audit``)."""
    from gate.pipeline.audit import finished_audit

    job_id = make_job(env, "withheld")  # audited, with its checkpoint
    with env.sessions() as s:
        audited = finished_audit(s, job_id)
        assert audited is not None and audited.artifact_sha256 == s.scalars(
            select(Artifact.sha256).where(Artifact.job_id == job_id)).one()
        s.get(Job, job_id).status = "failed"  # as if the verdict step had failed it instead
        s.commit()
        requeue_job(s, principal(env, s, "op"), job_id, {"reason": "retry"}, env.settings.jobs_dir)
        assert finished_audit(s, job_id) is None
    add_artifact(env, job_id, b"the retrained weights")
    with env.sessions() as s:
        assert finished_audit(s, job_id) is None  # the old audit examined other bytes
