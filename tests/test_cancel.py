"""``POST /v1/jobs/<id>/cancel``: a queued job ends at once (its webhook told), a training one at its next step, a
final one is 409."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from sqlalchemy import select
from test_api import Env, good_zip
from test_pipeline import _count, _job, _stored, job_id, rt  # noqa: F401  (fixtures)
from test_webhooks import _secret, _verified, receiver

from gate.auth import Principal
from gate.pipeline import audit, events, train, webhooks
from gate.pipeline.cancel import request_cancel
from gate.storage.models import Artifact, AuditLogEntry, Job, JobEvent

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def env(tmp_path, migrated) -> Env:
    return Env(tmp_path, migrated)


def _cancel(env: Env, job: str, who: str = "a"):
    return env.client.post(f"/v1/jobs/{job}/cancel", headers=env.headers(who))


def test_a_queued_job_is_cancelled_at_once_and_only_by_its_tenant(env):
    job = env.job(env.upload(good_zip()).json["id"]).json["id"]
    assert _cancel(env, job, "b").status_code == 404  # another tenant's job does not exist for globex
    r = _cancel(env, job)
    assert r.status_code == 202 and r.json["status"] == "cancelled" and r.json["finished_at"]
    with env.sessions() as s:
        entry = s.scalars(select(AuditLogEntry).where(AuditLogEntry.entity_id == job,
                                                      AuditLogEntry.to_state == "cancelled")).one()
        assert (entry.from_state, entry.actor_key_id) == ("queued", env.keys["a"].key_id)
        assert [(e.kind, e.data) for e in s.scalars(select(JobEvent))] == [("stage", {"status": "cancelled"})]


def test_a_queued_job_cancelled_through_the_api_posts_a_signed_cancelled_event(env):
    """The API posts nothing itself: the cancelled stage event is owed in the outbox, and a reaper's pass
    delivers it, signed with the tenant's secret."""
    env.settings = replace(env.settings, webhook_private_targets="allow")  # the receiver is on 127.0.0.1
    env.app.extensions["ftgate"].settings = env.settings
    secret = _secret(env)
    with receiver([200]) as (url, seen, _):
        job = env.job(env.upload(good_zip()).json["id"], webhook_url=url).json["id"]
        assert _cancel(env, job).status_code == 202
        assert seen == []
        assert webhooks.deliver_due(env.sessions, env.settings) == 1
    assert len(seen) == 1 and _verified(secret, *seen[0])
    sent = json.loads(seen[0][1])
    assert (sent["job"], sent["event"]["kind"], sent["event"]["data"]) == (job, "stage", {"status": "cancelled"})


def test_a_final_job_is_a_409_naming_its_state(env):
    job = env.job(env.upload(good_zip()).json["id"]).json["id"]
    assert _cancel(env, job).status_code == 202
    again = _cancel(env, job)
    assert again.status_code == 409
    assert (again.json["error"]["reason"], again.json["error"]["state"]) == ("job_final", "cancelled")


def test_an_auditing_job_is_not_cancellable(env):
    job = env.job(env.upload(good_zip()).json["id"]).json["id"]
    with env.sessions() as s:
        s.get(Job, job).status = "auditing"
        s.commit()
    r = _cancel(env, job)
    assert r.status_code == 409
    assert (r.json["error"]["reason"], r.json["error"]["state"]) == ("not_cancellable", "auditing")


def test_cancel_mid_training_stops_at_the_next_step_and_stores_nothing(rt, job_id, monkeypatch):  # noqa: F811
    """The customer cancels while step 1 of 3 reports: the worker stops there, the job ends ``cancelled`` with
    its lease released, no checkpoint is stored, and the audit has nothing to do."""
    customer = Principal(key_id=None, tenant_id="acme", role="customer")
    reports = []
    real = train._report_progress

    def cancelling_at_step_one(rt_, job, worker, heartbeat):
        progress = real(rt_, job, worker, heartbeat)

        def report(fraction, stage):
            reports.append((round(fraction, 2), stage))
            if stage == "training" and fraction > 0:
                with rt.sessions() as s:
                    assert request_cancel(s, s.get(Job, job), customer).status == "training"
            progress(fraction, stage)

        return report

    monkeypatch.setattr(train, "_report_progress", cancelling_at_step_one)
    assert train.train(rt, job_id, "w1/a") is False
    assert reports == [(0.0, "training"), (0.33, "training")]  # never reached step 2
    job = _job(rt, job_id)
    assert (job.status, job.worker, job.lease_expires_at) == ("cancelled", None, None)
    assert job.cancel_requested_at is not None and job.finished_at is not None
    assert _count(rt, Artifact) == 0 and _stored(rt, ".safetensors") == []
    assert not (rt.settings.jobs_dir / job_id / train.TRAINING_STATE).exists()
    assert audit.audit(rt, job_id, "w2/b") is False  # the chain's next stage finds nothing to audit
    with rt.sessions() as s:
        assert [e.data["status"] for e in events.after(s, job_id, 0, 10) if e.kind == "stage"][-1] == "cancelled"
