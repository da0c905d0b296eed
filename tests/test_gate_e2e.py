"""The gate as it runs in service: a real Redis broker, real ``ftgate worker`` and ``ftgate serve`` processes,
jobs submitted over HTTP on the shapes world. The broker is the machine's Redis on 127.0.0.1:6379 when one
answers (the production configuration), otherwise the embedded one."""

from __future__ import annotations

import time

import requests
from sqlalchemy import func, select
from test_pipeline import world_zip

from auditing.shapes.cli import PRETRAINED_WORLD
from gate.auth import create_key, ensure_tenant
from gate.storage.audit_log import SYSTEM
from gate.storage.db import make_engine, session_factory
from gate.storage.models import Artifact, AuditLogEntry, Verdict
from gate.worker.local import LocalGate

SYSTEM_REDIS = "redis://127.0.0.1:6379/13"
PROBES = "prompt\na red triangle\na blue circle\na green square\n"
FINAL = ("released", "review", "withheld", "failed")


def _system_redis() -> str | None:
    import redis

    try:
        client = redis.Redis.from_url(SYSTEM_REDIS, socket_timeout=1)
        client.flushdb()
        return SYSTEM_REDIS
    except redis.RedisError:
        return None


class Session:
    """A running gate with an operator, a customer and a registered world base model."""

    def __init__(self, tmp_path, lease_seconds: int):
        env = {"FTGATE_LEASE_SECONDS": str(lease_seconds)}
        if (url := _system_redis()) is not None:
            env["FTGATE_BROKER_URL"] = url
        self.gate = LocalGate(tmp_path / "state", env=env)
        self.tmp = tmp_path

    def __enter__(self):
        self.gate.start()
        self.sessions = session_factory(make_engine(self.gate.settings.database_url))
        with self.sessions() as s:
            for tenant in ("platform", "acme"):
                ensure_tenant(s, tenant, SYSTEM)
            self.keys = {"op": create_key(s, "platform", "operator", SYSTEM).key,
                         "a": create_key(s, "acme", "customer", SYSTEM).key}
            s.commit()
        probes = self.tmp / "probes.csv"
        probes.write_text(PROBES)
        profile = {"probes": str(probes), "detector": "shapes", "detector_options": {"concept": "red triangle"},
                   "images_per_prompt": 2, "inference_steps": 8, "guidance_scale": 5.0, "batch_size": 8}
        r = self.post("op", "/v1/base-models", json={"name": "world", "path": str(PRETRAINED_WORLD),
                                                     "audit_profile": profile})
        assert r.status_code == 201, r.text
        self.base_model = r.json()["id"]
        return self

    def __exit__(self, *exc):
        self.gate.stop()

    def headers(self, who):
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def post(self, who, path, **kwargs):
        return requests.post(self.gate.url + path, headers=self.headers(who), timeout=30, **kwargs)

    def get(self, who, path):
        return requests.get(self.gate.url + path, headers=self.headers(who), timeout=30)

    def submit(self, steps: int) -> str:
        ds = self.post("a", "/v1/datasets", files={"file": ("d.zip", world_zip(8))})
        assert ds.status_code == 201, ds.text
        job = self.post("a", "/v1/jobs", json={"base_model": self.base_model, "dataset": ds.json()["id"],
                                               "method": "lora", "hyperparameters": {
                                                   "steps": steps, "rank": 2, "learning_rate": 1e-3,
                                                   "batch_size": 4}})
        assert job.status_code == 201, job.text
        return job.json()["id"]

    def wait(self, job_id: str, until, timeout_s: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.get("a", f"/v1/jobs/{job_id}").json()
            if until(job):
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} never got there; last seen {job}; logs in {self.gate.log_dir}")

    def count(self, model, job_id) -> int:
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(model).where(model.job_id == job_id))


def test_a_job_goes_from_upload_to_verdict_through_the_api(tmp_path):
    with Session(tmp_path, lease_seconds=30) as gate:
        job_id = gate.submit(steps=6)
        job = gate.wait(job_id, lambda j: j["status"] in FINAL)
        assert job["status"] in ("released", "review", "withheld"), job
        assert job["verdict"]["decision"] == {"released": "pass", "review": "flag", "withheld": "block"}[job["status"]]
        assert job["artifact"]["kind"] == "lora" and job["attempts"] == 1
        report = gate.get("a", f"/v1/jobs/{job_id}/report").json()
        assert report["verdict"]["decision"] == job["verdict"]["decision"]
        assert report["baseline"] is not None and len(report["samples"]) == 6  # 3 probes x 2, paired with base
        download = gate.get("a", f"/v1/jobs/{job_id}/artifact")
        assert download.status_code == (200 if job["status"] == "released" else 403)
        states = [(e["from_state"], e["to_state"]) for e in gate.get("a", f"/v1/jobs/{job_id}/log").json()["entries"]
                  if e["action"] == "status"]
        assert states == [("queued", "training"), ("training", "auditing"), ("auditing", job["status"])]


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
