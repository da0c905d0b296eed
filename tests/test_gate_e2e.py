"""The gate as it runs in service: a real Redis broker, real ``ftgate worker`` and ``ftgate serve`` processes,
jobs submitted over HTTP on the shapes world. The broker is the machine's Redis on 127.0.0.1:6379 when one
answers (the production configuration; an empty database claimed for the test), otherwise the embedded one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager

from sqlalchemy import select

from gate.storage.models import Artifact, AuditLogEntry, Verdict
from gate.worker.faults import FINAL, GateSession

SYSTEM_REDIS = "redis://127.0.0.1:6379"
CLAIM_KEY = "ftgate:e2e-claim"
CLAIM_TTL_S = 3600


@contextmanager
def _system_redis():
    """A database of the machine's Redis that no one else uses, claimed for this test (None if no Redis
    answers): two test sessions on one machine must not take each other's jobs."""
    import redis

    try:
        redis.Redis.from_url(SYSTEM_REDIS, socket_timeout=1).ping()
    except redis.RedisError:
        yield None
        return
    for db in range(1, 16):
        client = redis.Redis.from_url(f"{SYSTEM_REDIS}/{db}", socket_timeout=1)
        if client.dbsize() == 0 and client.set(CLAIM_KEY, os.getpid(), nx=True, ex=CLAIM_TTL_S):
            break
    else:
        raise RuntimeError(f"no empty database left on {SYSTEM_REDIS} for the end-to-end test")
    try:
        yield f"{SYSTEM_REDIS}/{db}"
    finally:
        client.flushdb()  # the claim and whatever the gate left in its queues


@contextmanager
def Session(tmp_path, lease_seconds: int):
    """A running gate (``gate.worker.faults.GateSession``, plain ``ftgate worker`` processes) on a database of
    the machine's Redis of its own when one answers."""
    with _system_redis() as url, GateSession(tmp_path, lease_seconds, env={"FTGATE_BROKER_URL": url} if url else None,
                                             worker_module="gate.cli") as gate:
        yield gate


def test_a_job_goes_from_upload_to_verdict_through_the_api(tmp_path):
    with Session(tmp_path, lease_seconds=30) as gate:
        job_id = gate.submit(steps=6)
        job = gate.wait(job_id, lambda j: j["status"] in FINAL)
        assert job["status"] in ("released", "review", "withheld"), job
        assert job["verdict"]["decision"] == {"released": "pass", "review": "flag", "withheld": "block"}[job["status"]]
        assert job["artifact"]["kind"] == "lora" and job["attempts"] == 1
        report = gate.get("op", f"/v1/jobs/{job_id}/report").json()
        assert report["verdict"]["decision"] == job["verdict"]["decision"]
        assert report["baseline"] is not None and report["families"]["profile"]["images"] == 6  # 3 probes x 2
        assert len(report["samples"]) == sum(f["images"] for f in report["families"].values())
        seen = gate.get("a", f"/v1/jobs/{job_id}/report").json()  # the customer's view: verdict and figures
        assert seen["verdict"]["decision"] == job["verdict"]["decision"] and "samples" not in seen
        assert seen["metrics"]["comparison"] == report["metrics"]["comparison"]
        download = gate.get("a", f"/v1/jobs/{job_id}/artifact")
        assert download.status_code == (200 if job["status"] == "released" else 403)
        states = [(e["from_state"], e["to_state"]) for e in gate.get("a", f"/v1/jobs/{job_id}/log").json()["entries"]
                  if e["action"] == "status"]
        assert states == [("queued", "training"), ("training", "auditing"), ("auditing", job["status"])]
        # Celery's own tools reach the running worker through the module-level app (gate.worker.celery).
        registered = subprocess.run([sys.executable, "-m", "celery", "-A", "gate.worker", "inspect", "registered",
                                     "--json", "--timeout", "10"], env=gate.gate.env, capture_output=True, text=True,
                                    timeout=120, check=True)
        (tasks,) = json.loads(registered.stdout.strip().splitlines()[-1]).values()
        assert {"gate.train", "gate.audit", "gate.align"} <= set(tasks)


def test_a_worker_killed_mid_training_loses_nothing_and_duplicates_nothing(tmp_path):
    """kill -9 of the worker (and its job process) while it trains: after a new worker starts, the reaper
    hands the job on once its lease expires, and the job ends with one verdict and one checkpoint."""
    with Session(tmp_path, lease_seconds=4) as gate:
        job_id = gate.submit(steps=120)
        gate.wait(job_id, lambda j: j["status"] == "training" and j["progress"] > 0)
        gate.gate.kill_worker(gate.gate.workers[0])
        gate.gate.start_worker()
        job = gate.wait(job_id, lambda j: j["status"] in FINAL, timeout_s=600)
        assert job["status"] in ("released", "review", "withheld"), job
        assert job["attempts"] == 2
        assert gate.count(Verdict, job_id) == 1 and gate.count(Artifact, job_id) == 1
        stored = list((gate.gate.state_dir / "artifacts" / "tenants" / "acme").rglob("*.safetensors"))
        assert len(stored) == 1  # the killed attempt left no second checkpoint in the store
        with gate.sessions() as s:
            reasons = [e.reason for e in s.scalars(select(AuditLogEntry).where(
                AuditLogEntry.entity_id == job_id, AuditLogEntry.action == "status",
                AuditLogEntry.to_state == "queued"))]
        assert len(reasons) == 1 and "lease" in reasons[0] and "expired" in reasons[0]
