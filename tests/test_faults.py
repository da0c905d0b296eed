"""Faults the gate must survive without losing a job, duplicating a result or releasing an unaudited checkpoint.

In process (default suite): the audit deadline cuts off a hanging renderer and the job is blocked as "audit
incomplete"; a job the broker cannot take is failed at once, not left queued forever. With real processes
(``gate.worker.faults`` drives a ``LocalGate``; marked slow): workers ``kill -9``-ed inside each stage, jobs
stranded with no message (a worker killed between training's commit and the audit's message, the broker down
when the reaper sends a reaped job, the database down when a task starts, messages deleted from Redis), the
broker killed and restarted from its append-only file under queued jobs, an auditor whose detector crashes
or whose renderer hangs. The embedded Redis of each test's own state directory is the broker, never the
machine's shared one.
"""

from __future__ import annotations

import io
import signal
import threading
import time
from dataclasses import replace

import pytest
from sqlalchemy import select
from test_api import Env, good_zip, registrable_model
from test_pipeline import job_id, rt  # noqa: F401  (fixtures: a runtime, and a queued job on the world)

from gate.pipeline import audit, verdict
from gate.pipeline.audit import AuditDeadlineExceeded, deadline
from gate.pipeline.runtime import Runtime
from gate.storage.audit_log import SYSTEM, transition
from gate.storage.models import Artifact, AuditLogEntry, Job, Verdict
from gate.worker import faults

KILL_CYCLES = 10  # per stage
STRANDED_CYCLES = 2  # per window where only the reconciler recovers the job
HANG_S = 120.0
DEADLINE_S = 10  # room to load the pipeline on a busy machine before the render hangs


# --- the audit deadline ------------------------------------------------------------------------------------

def test_deadline_interrupts_a_stuck_block_and_leaves_no_timer_behind():
    before = signal.getsignal(signal.SIGALRM)
    t0 = time.monotonic()
    with pytest.raises(AuditDeadlineExceeded, match="deadline of 0.3 s"):
        with deadline(0.3):
            time.sleep(HANG_S)
    assert time.monotonic() - t0 < HANG_S / 10
    with deadline(5):
        time.sleep(0.01)  # finishes in time: not interrupted
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is before


def test_deadline_outside_the_main_thread_is_left_to_celerys_limits(caplog):
    """Signals reach only the main thread; elsewhere the block runs unbounded and a warning says so."""
    done = []

    def work():
        with deadline(0.05):
            time.sleep(0.2)
        done.append(True)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert done == [True] and "not enforced outside the main thread" in caplog.text


def test_a_render_that_hangs_is_cut_off_by_the_deadline_and_blocks_the_job(rt, job_id, monkeypatch):  # noqa: F811
    """The audit stage with a renderer that never returns: past ``audit_deadline_seconds`` the audit ends as a
    block, "audit incomplete", and the job is withheld. (No training here: the job gets a stored checkpoint
    row directly and the auditor applies nothing; the slow end-to-end test runs the real thing.)"""
    import auditing.render

    with rt.sessions() as s:
        job = s.get(Job, job_id)
        stored = rt.store.put(job.tenant_id, io.BytesIO(b"a checkpoint"), suffix=".safetensors")
        s.add(Artifact(tenant_id=job.tenant_id, job_id=job_id, kind="lora", sha256=stored.sha256, path=stored.key,
                       size_bytes=stored.size_bytes))
        for state in ("training", "auditing"):
            transition(s, job, state, SYSTEM)
        s.commit()
        audit.ensure_baseline(rt, job.base_model_id)  # the base model's figures exist

    hung = []

    def hangs(*args, **kwargs):
        hung.append(time.monotonic())
        time.sleep(HANG_S)

    monkeypatch.setattr(audit, "apply_checkpoint", lambda pipe, kind, weights, scale=1.0: pipe)
    monkeypatch.setattr(auditing.render, "render_batch", hangs)
    strict = Runtime(replace(rt.settings, audit_deadline_seconds=DEADLINE_S), rt.engine, rt.sessions, rt.store)
    t0 = time.monotonic()
    assert audit.audit(strict, job_id, "w1/b") is True
    assert len(hung) == 1 and time.monotonic() - t0 < DEADLINE_S + HANG_S / 10  # it hung, and was cut off
    assert verdict.decide(strict, job_id) == "withheld"
    with rt.sessions() as s:
        reasons = s.scalars(select(Verdict)).one().reasons
    assert reasons[0].startswith("audit incomplete") and "AuditDeadlineExceeded" in reasons[0], reasons


# --- the broker refuses a job ------------------------------------------------------------------------------

class DownBroker:
    """A dispatcher whose broker is unreachable (what kombu raises after its publish retries)."""

    def _refuse(self, *args) -> None:
        from kombu.exceptions import OperationalError

        raise OperationalError("Error 111 connecting to the broker: Connection refused")

    job = baseline = alignment = _refuse


def test_a_job_the_broker_cannot_take_fails_at_once_instead_of_waiting_forever(tmp_path, migrated):
    env = Env(tmp_path, migrated)
    dataset = env.upload(good_zip()).json["id"]
    env.app.extensions["ftgate"].dispatcher = DownBroker()
    r = env.job(dataset)
    assert r.status_code == 503 and r.json["error"]["reason"] == "queue_unavailable"
    refused = r.json["error"]["job"]
    with env.sessions() as s:
        job = s.get(Job, refused)
        states = [(e.from_state, e.to_state) for e in s.scalars(
            select(AuditLogEntry).where(AuditLogEntry.entity_id == refused).order_by(AuditLogEntry.id))]
    assert job.status == "failed" and "could not be queued" in job.error and job.finished_at is not None
    assert states == [(None, "queued"), ("queued", "failed")]
    detail = env.client.get(f"/v1/jobs/{refused}", headers=env.headers("a")).json
    assert detail["status"] == "failed" and detail["verdict"] is None


def test_a_hardening_run_the_broker_cannot_take_fails_at_once(tmp_path, migrated):
    from test_api_results import alignment_config

    env = Env(tmp_path, migrated)
    env.app.extensions["ftgate"].dispatcher = DownBroker()
    r = env.client.post("/v1/alignments", headers=env.headers("op"), json={"name": "h", "config": alignment_config()})
    assert r.status_code == 503 and r.json["error"]["reason"] == "queue_unavailable"
    run = env.client.get(f"/v1/alignments/{r.json['error']['run']}", headers=env.headers("op")).json
    assert run["status"] == "failed" and "could not be queued" in run["error"], run


def test_a_base_model_stays_registered_when_its_baseline_cannot_be_queued(tmp_path, migrated):
    """The baseline message is lost, not the model: the first audit on it audits the baseline first."""
    env = Env(tmp_path, migrated)
    env.app.extensions["ftgate"].dispatcher = DownBroker()
    model, probes = registrable_model(tmp_path)
    r = env.client.post("/v1/base-models", headers=env.headers("op"), json={
        "name": "m", "path": str(model), "audit_profile": {"probes": str(probes), "detector": "shapes"}})
    assert r.status_code == 201 and r.json["baseline_ready"] is False, r.json
    with env.sessions() as s:
        actions = s.scalars(select(AuditLogEntry.action).where(AuditLogEntry.entity_id == r.json["id"])
                            .order_by(AuditLogEntry.id)).all()
    assert actions == ["created", "baseline not queued"]


# --- real processes ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_workers_killed_in_every_stage_lose_nothing_and_duplicate_nothing(tmp_path):
    """``kill -9`` of the worker's process group while it trains, audits and records the verdict, KILL_CYCLES
    times each: every kill lands in its stage, every job ends with exactly one verdict (matching its final
    state), one artifact row and one finished audit; the store holds one checkpoint and one report per job."""
    result = faults.kill_campaign(tmp_path, KILL_CYCLES)
    jobs = KILL_CYCLES * len(faults.STAGES)
    for stage, tally in result["stages"].items():
        assert tally["cycles"] == tally["kills_in_stage"] == tally["final"] == KILL_CYCLES, (stage, tally)
        assert tally["failed"] == 0 and set(tally["statuses"]) <= {"released", "review", "withheld"}, tally
        assert tally["one_verdict"] == tally["one_artifact"] == tally["one_audit"] == KILL_CYCLES, (stage, tally)
        # Each lost worker costs an attempt: training takes the job again; a reaped audit counts its retry.
        assert tally["attempts_match_expiries"] == KILL_CYCLES, (stage, tally)
        # The reaper took each job from its dead worker (a second expiry: a verdict that waited past the lease).
        assert "0" not in tally["lease_expiries"], (stage, tally)
    assert result["jobs"] == result["distinct_jobs"] == jobs
    assert result["stored_checkpoints"] == result["stored_reports"] == jobs
    assert result["stored_partial_files"] == 0 and result["store_matches_artifact_rows"]


@pytest.mark.slow
def test_jobs_stranded_without_a_message_are_sent_again_and_finish_once(tmp_path):
    """No lease left to expire and no message to start the next stage: a worker killed after training committed
    but before Celery sent the audit message; the broker down while the reaper hands a dead worker's job back;
    the database down when the task starts. Each job ends final exactly once, sent again by the reconciler."""
    windows = ("trained", *faults.OUTAGES)
    result = faults.kill_campaign(tmp_path, STRANDED_CYCLES, windows)
    for window, tally in result["stages"].items():
        assert tally["cycles"] == tally["kills_in_stage"] == tally["final"] == STRANDED_CYCLES, (window, tally)
        assert tally["failed"] == 0 and set(tally["statuses"]) <= {"released", "review", "withheld"}, tally
        assert tally["one_verdict"] == tally["one_artifact"] == tally["one_audit"] == STRANDED_CYCLES, tally
        assert tally["redispatched"] == tally["attempts_match_expiries"] == STRANDED_CYCLES, (window, tally)
    assert "0" not in result["stages"]["broker-at-reap"]["lease_expiries"]  # the reaper did hand it back
    assert result["jobs"] == result["distinct_jobs"] == STRANDED_CYCLES * len(windows)
    assert result["stored_checkpoints"] == result["stored_reports"] == result["jobs"]
    assert result["stored_partial_files"] == 0 and result["store_matches_artifact_rows"]


@pytest.mark.slow
def test_jobs_whose_messages_were_deleted_from_the_broker_finish_once(tmp_path):
    jobs = 2
    result = faults.lost_messages(tmp_path, jobs)
    assert result["messages_deleted"] == result["kills_in_stage"] == jobs
    assert result["final"] == result["one_verdict"] == result["one_artifact"] == result["redispatched"] == jobs
    assert result["failed"] == 0 and result["attempts"] == {"1": jobs}, result


@pytest.mark.slow
def test_a_broker_killed_and_restarted_under_queued_jobs_loses_none(tmp_path):
    """Jobs queued with no worker survive a ``kill -9`` of Redis (AOF); a job submitted while Redis is down is
    refused with 503 and failed, not stranded; the API's dispatcher reconnects; a worker then runs them all."""
    jobs = 3
    result = faults.broker_restart(tmp_path, jobs=jobs)
    assert result["broker_down"] and result["broker_restarted"]
    assert result["queued_before_restart"] == result["queued_after_restart"] == jobs
    assert result["submitted_while_down"] == {"status_code": 503, "reason": "queue_unavailable",
                                              "job_status": "failed"}
    assert result["jobs"] == result["final"] == result["one_verdict"] == result["one_artifact"] == jobs + 1
    assert set(result["statuses"]) <= {"released", "review", "withheld"}, result


@pytest.mark.slow
def test_an_auditor_that_crashes_or_hangs_blocks_the_job_and_withholds_its_checkpoint(tmp_path):
    deadline_s = 20
    result = faults.auditor_failure(tmp_path, deadline_s=deadline_s)
    for fault, why in ((faults.DETECTOR_RAISES, "the detector crashed"),
                       (faults.RENDER_HANGS, "AuditDeadlineExceeded")):
        outcome = result[fault]
        assert (outcome["status"], outcome["verdict"]) == ("withheld", "block"), outcome
        assert outcome["reasons"][0].startswith("audit incomplete") and why in outcome["reasons"][0], outcome
        assert outcome["report_reasons"] == outcome["reasons"]
        assert outcome["artifact_downloadable"] is False and outcome["artifact_status"] == 403
    assert result[faults.RENDER_HANGS]["audit_seconds"] < faults.HANG_S / 10  # cut off, not waited out
