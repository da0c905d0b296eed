"""``GET /v1/jobs/<id>/events``: the events the worker writes (stage changes, losses, sample grids, checkpoints,
the verdict), numbered per job, tenant-scoped, with nothing of the audit's internals; and the shipped client
(``gate.client``) reading them and cancelling against the real API."""

from __future__ import annotations

import io
import json

import pytest
from sqlalchemy import select
from test_api import Env, RecordingDispatcher, good_zip, served
from test_pipeline import PROBES, job_id, rt  # noqa: F401  (fixtures)

from gate.api import create_app
from gate.auth import create_key, ensure_tenant
from gate.client import Client, GateError
from gate.pipeline import events, train, verdict
from gate.storage.audit_log import SYSTEM
from gate.storage.models import Artifact, Audit, Job, utcnow
from gate.storage.sweep import referenced_keys
from gate.training import loop

pytestmark = pytest.mark.usefixtures("one_thread")


def _get(client, job: str, key, after: int | None = None):
    query = "" if after is None else f"?after={after}"
    return client.get(f"/v1/jobs/{job}/events{query}", headers={"Authorization": f"Bearer {key.key}"})


SECRET = "/srv/gate/secret-pool.csv"  # what an incomplete audit's reason may name, and a customer must not read


def _audited(rt, job_id: str, decision: str, reasons: list[str]) -> None:  # noqa: F811
    """A finished audit of the job, as the audit stage leaves one (its report reduced to what decide reads)."""
    report = {"verdict": {"decision": decision, "rule": "r", "policy": {"name": "default", "version": 3},
                          "probes": PROBES}}
    stored = rt.store.put("acme", io.BytesIO(json.dumps(report).encode()), suffix=".json")
    with rt.sessions() as s:
        audited = s.scalars(select(Artifact.sha256).where(Artifact.job_id == job_id)).one()
        s.add(Audit(tenant_id="acme", job_id=job_id, artifact_sha256=audited, report_path=stored.key,
                    report_sha256=stored.sha256, decision=decision, reasons=reasons, finished_at=utcnow()))
        s.commit()


def test_a_job_run_leaves_its_events_in_order_and_shows_no_audit_internals(rt, job_id, monkeypatch):  # noqa: F811
    monkeypatch.setattr(loop, "SAMPLE_INFERENCE_STEPS", 1)  # sample grids are what is tested, not their looks
    monkeypatch.setattr(loop, "SAMPLE_IMAGES", 1)
    with rt.sessions() as s:
        acme = create_key(s, "acme", "customer", SYSTEM)
        ensure_tenant(s, "globex", SYSTEM)
        globex = create_key(s, "globex", "customer", SYSTEM)
        s.commit()
    client = create_app(rt.settings, dispatcher=RecordingDispatcher()).test_client()
    assert train.train(rt, job_id, "w1/a") is True
    _audited(rt, job_id, "block", [f"audit incomplete: {SECRET} is unreadable"])
    final = verdict.decide(rt, job_id)
    assert final == "withheld"

    page = _get(client, job_id, acme).json
    seqs = [e["seq"] for e in page["events"]]
    assert seqs == list(range(1, len(seqs) + 1)) and page["next"] == seqs[-1]
    kinds = [e["kind"] for e in page["events"]]
    stages = [e["data"]["status"] for e in page["events"] if e["kind"] == "stage"]
    assert stages == ["training", "auditing", final]
    assert [e["data"]["step"] for e in page["events"] if e["kind"] == "loss"] == [1, 2, 3]  # steps=3: every step
    assert all(isinstance(e["data"]["loss"], float) for e in page["events"] if e["kind"] == "loss")
    assert [e["data"]["step"] for e in page["events"] if e["kind"] == "checkpoint"] == [1, 2]
    samples = [e for e in page["events"] if e["kind"] == "sample"]
    assert [e["data"]["step"] for e in samples] == [1, 2, 3]
    assert kinds[-2:] == ["verdict", "stage"]
    (decided,) = [e["data"] for e in page["events"] if e["kind"] == "verdict"]
    assert decided == {"decision": "block", "reasons": ["audit incomplete"], "policy": "default v3"}
    text = json.dumps(page)
    for prompt in PROBES.splitlines()[1:]:  # the probe prompts stay the auditor's
        assert prompt not in text
    assert SECRET not in text and str(rt.settings.state_dir) not in text

    rest = _get(client, job_id, acme, after=seqs[-3]).json
    assert [e["seq"] for e in rest["events"]] == seqs[-2:] and rest["next"] == seqs[-1]
    assert _get(client, job_id, acme, after=seqs[-1]).json == {"events": [], "next": seqs[-1]}
    assert _get(client, job_id, globex).status_code == 404  # another tenant's job does not exist for globex
    bad = _get(client, job_id, acme, after=-1)
    assert bad.status_code == 400 and bad.json["error"]["field"] == "after"

    url, auth = samples[-1]["data"]["url"], {"Authorization": f"Bearer {acme.key}"}
    withheld = client.get(url, headers=auth)
    assert withheld.status_code == 403 and withheld.json["error"]["reason"] == "sample_withheld"
    assert client.get(url, headers={"Authorization": f"Bearer {globex.key}"}).status_code == 404
    with rt.sessions() as s:
        assert {e.artifact_key for e in events.after(s, job_id, 0, 100) if e.artifact_key} <= referenced_keys(s)
        s.get(Job, job_id).status = "released"  # as if a reviewer had approved it
        s.commit()
    image = client.get(url, headers=auth)
    assert image.status_code == 200 and image.data.startswith(b"\x89PNG")


def test_the_shipped_client_cancels_and_reads_events(tmp_path, migrated):
    env = Env(tmp_path, migrated)
    body = {"base_model": env.base_model_id, "dataset": env.upload(good_zip()).json["id"], "method": "lora",
            "hyperparameters": {"steps": 100, "rank": 4, "learning_rate": 1e-4}}
    job = env.client.post("/v1/jobs", headers=env.headers("a"), json=body).json["id"]
    with served(env.app) as url:
        client = Client(url, env.keys["a"].key)
        assert client.events(job) == {"events": [], "next": 0}
        assert client.cancel(job)["status"] == "cancelled"
        page = client.events(job)
        assert [(e["seq"], e["kind"], e["data"]) for e in page["events"]] == [(1, "stage", {"status": "cancelled"})]
        assert client.events(job, after=page["next"])["events"] == []
        with pytest.raises(GateError) as refused:
            client.cancel(job)
        assert refused.value.status == 409
