"""The Flask API: uploads through the intake, jobs, tenancy, roles, errors, health and the OpenAPI document."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import threading
import zipfile
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select
from werkzeug.serving import make_server

from auditing.detectors.base import Detector, DetectorResult
from gate.api import create_app
from gate.auth import create_key, ensure_tenant, revoke_key
from gate.pipeline import intake
from gate.pipeline.runtime import Runtime
from gate.settings import Limits, Settings
from gate.storage.audit_log import SYSTEM
from gate.storage.db import make_engine, session_factory, upgrade
from gate.storage.models import AuditLogEntry, BaseModel, Dataset, Job

UPLOAD_LIMIT = 300_000


class RedScanner(Detector):
    """Fake scanner: an image is unsafe when most of its pixels are pure red."""

    name = "red"
    version = "1"
    rule = "share of pure red pixels > 0.5"

    def detect(self, images):
        shares = [float(np.mean(np.all(np.asarray(im) == (255, 0, 0), axis=-1))) for im in images]
        return [DetectorResult(s, s > 0.5) for s in shares]


def png(color=(0, 128, 255), size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@contextmanager
def served(app):
    """``app`` on a free loopback port, answering in threads (real HTTP for clients and browsers); yields its URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()


def registrable_model(tmp_path: Path) -> tuple[Path, Path]:
    """A folder that registers as a base model (a UNet's weights file and model_index.json, never loaded) and a
    one-prompt probe CSV for its audit profile."""
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (model / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    probes = tmp_path / "probes.csv"
    probes.write_text("prompt\na red triangle\n")
    return model, probes


def good_zip(n: int = 3, red: int = 0) -> bytes:
    members = {}
    for i in range(n):
        members[f"img{i}.png"] = png((255, 0, 0) if i < red else (0, 10 * i, 200))
        members[f"img{i}.txt"] = f"a blue square number {i}".encode()
    return make_zip(members)


def detectors(nudenet: Detector):
    """A ``load_detector`` for the intake stage in which ``nudenet`` stands in for NudeNet (the others load)."""
    from auditing.detectors.registry import load_detector

    return lambda name, **options: nudenet if name == "nudenet" else load_detector(name, **options)


class RecordingDispatcher:
    """Records what the API hands to the worker queues; ``intake(dataset_id)``, if given, is what a worker on the
    intake queue does with a dataset's message, run at once (the test's stand-in for the queue)."""

    def __init__(self, intake=None):
        self.jobs: list[str] = []
        self.datasets: list[str] = []
        self.baselines: list[str] = []
        self.alignments: list[str] = []
        self.intake = intake

    def job(self, job_id: str) -> None:
        self.jobs.append(job_id)

    def dataset(self, dataset_id: str) -> None:
        self.datasets.append(dataset_id)
        if self.intake is not None:
            self.intake(dataset_id)

    def baseline(self, base_model_id: str) -> None:
        self.baselines.append(base_model_id)

    def alignment(self, run_id: str) -> None:
        self.alignments.append(run_id)


class Env:
    def __init__(self, tmp_path: Path, migrated: Path | None = None, limits: Limits | None = None):
        """``migrated``: a database file already at the schema head (conftest's ``migrated``) to copy instead of
        running the migrations; ``limits``: the platform limits, if not this file's."""
        self.state = tmp_path / "state"
        database = tmp_path / "ftgate.db"
        self.settings = Settings(state_dir=self.state, database_url=f"sqlite:///{database}", broker_url=None,
                                 artifacts_dir=self.state / "artifacts",
                                 limits=limits or Limits(max_upload_bytes=UPLOAD_LIMIT, contamination_flag_ratio=0.0))
        if migrated is None:
            upgrade(self.settings.database_url)
        else:
            with closing(sqlite3.connect(migrated)) as src, closing(sqlite3.connect(database)) as dst:
                src.backup(dst)  # the database as committed, WAL included (a file copy may miss it)
        self.engine = make_engine(self.settings.database_url)
        self.sessions = session_factory(self.engine)
        self.runtime = Runtime.open(self.settings)
        self.scanner: Detector = RedScanner()  # NudeNet's stand-in in the intake
        self.dispatcher = RecordingDispatcher(intake=self.run_intake)
        self.enqueued = self.dispatcher.jobs
        self.app = create_app(self.settings, dispatcher=self.dispatcher)
        self.client = self.app.test_client()
        with self.sessions() as s:
            for tenant in ("acme", "globex", "platform"):
                ensure_tenant(s, tenant, SYSTEM)
            self.keys = {"a": create_key(s, "acme", "customer", SYSTEM),
                         "b": create_key(s, "globex", "customer", SYSTEM),
                         "op": create_key(s, "platform", "operator", SYSTEM),
                         "rev": create_key(s, "platform", "reviewer", SYSTEM)}
            base = BaseModel(name="sd-tiny", path=str(tmp_path), weights_sha256="0" * 64)
            s.add(base)
            s.commit()
            self.base_model_id = base.id

    def headers(self, who: str) -> dict:
        return {"Authorization": f"Bearer {self.keys[who].key}"}

    def run_intake(self, dataset_id: str) -> str | None:
        """The worker's intake stage on ``dataset_id`` (``gate.pipeline.intake.run``), with this env's scanner."""
        return intake.run(self.runtime, dataset_id, "test-worker/intake", load=detectors(self.scanner))

    def upload(self, data: bytes, who: str = "a"):
        return self.client.post("/v1/datasets", headers=self.headers(who),
                                data={"file": (io.BytesIO(data), "set.zip")}, content_type="multipart/form-data")

    def count(self, model) -> int:
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(model))

    def dataset_files(self) -> list[Path]:
        root = self.state / "datasets"
        return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []

    def job(self, dataset_id: str, who: str = "a", **overrides):
        body = {"base_model": self.base_model_id, "dataset": dataset_id, "method": "lora",
                "hyperparameters": {"steps": 100, "rank": 4, "learning_rate": 1e-4}, **overrides}
        return self.client.post("/v1/jobs", headers=self.headers(who), json=body)


@pytest.fixture
def env(tmp_path) -> Env:
    return Env(tmp_path)


def test_accepted_upload_creates_row_folder_and_log_entry(env):
    """The upload is stored and answered 202; the intake (run inline here) stores the prepared set in the store,
    records its figures per detector, and leaves no folder behind it."""
    r = env.upload(good_zip())
    assert r.status_code == 202, r.json
    body = r.json
    assert r.headers["Location"] == f"/v1/datasets/{body['id']}"
    assert body["status"] == "accepted" and body["image_count"] == 3 and body["contamination_ratio"] == 0
    assert body["refusal"] is None and body["error"] is None and body["intake"]["images"] == 3
    assert "scans" not in body["intake"]  # a customer reads no detector (gate.api.redaction.customer_intake)
    staff = env.client.get(f"/v1/datasets/{body['id']}", headers=env.headers("op")).json
    assert list(staff["intake"]["scans"]) == ["nudenet"]
    with env.sessions() as s:
        row = s.get(Dataset, body["id"])
        assert row.tenant_id == "acme" and row.content_sha256 == body["content_sha256"]
        assert (env.settings.artifacts_dir / row.artifact_path).is_file()
        log = s.scalars(select(AuditLogEntry).where(AuditLogEntry.entity_id == row.id)
                        .order_by(AuditLogEntry.id)).all()
        assert [(e.action, e.to_state) for e in log] == [("created", "received"), ("claimed", None),
                                                         ("status", "accepted")]
        with zipfile.ZipFile(env.settings.artifacts_dir / row.prepared_path) as prepared:
            assert sorted(prepared.namelist()) == ["00000.png", "00000.txt", "00001.png", "00001.txt",
                                                   "00002.png", "00002.txt", "intake.json"]
        assert (row.worker, row.lease_expires_at, row.attempts) == (None, None, 1)
    scratch = env.state / "intake"
    assert env.dataset_files() == [] and (not scratch.exists() or not any(scratch.iterdir()))
    assert env.client.get(f"/v1/datasets/{body['id']}", headers=env.headers("a")).json["id"] == body["id"]


def test_contaminated_upload_is_flagged(env):
    r = env.upload(good_zip(n=20, red=1))
    assert r.status_code == 202 and r.json["status"] == "flagged" and r.json["intake"]["flagged"] == ["img0.png"]


def review_dataset(env: Env, dataset_id: str, who: str = "rev", **body):
    return env.client.post(f"/v1/datasets/{dataset_id}/review", headers=env.headers(who), json=body)


def dataset_log(env: Env, dataset_id: str) -> list[AuditLogEntry]:
    with env.sessions() as s:
        return list(s.scalars(select(AuditLogEntry).where(AuditLogEntry.entity_type == "datasets",
                                                          AuditLogEntry.entity_id == dataset_id)
                              .order_by(AuditLogEntry.id)))


def test_a_flagged_dataset_trains_only_after_a_reviewer_accepts_it(env):
    """A flagged dataset is refused for jobs (409 naming the dataset) until a reviewer accepts it with a reason;
    the queue lists it with its intake figures for staff only; the decision is logged with the reviewer's key."""
    dataset = env.upload(good_zip(n=20, red=1)).json["id"]
    refused = env.job(dataset)
    assert refused.status_code == 409 and refused.json["error"]["reason"] == "dataset_not_trainable"
    assert refused.json["error"]["field"] == "dataset" and "waits for a reviewer" in refused.json["error"]["message"]
    assert env.count(Job) == 0 and env.enqueued == []

    for who in ("rev", "op"):
        (queued,) = env.client.get("/v1/dataset-reviews", headers=env.headers(who)).json["datasets"]
        assert (queued["id"], queued["tenant"], queued["status"]) == (dataset, "acme", "flagged")
        assert queued["review"] is None
        assert queued["intake"]["unsafe_images"] == 1 and queued["intake"]["images"] == 20
        assert queued["intake"]["flagged"] == ["img0.png"] and queued["intake"]["scanner"]["name"] == "red"
    for who in ("a", "b"):  # customers see no queue, and another tenant's dataset is missing
        r = env.client.get("/v1/dataset-reviews", headers=env.headers(who))
        assert r.status_code == 403 and r.json["error"]["reason"] == "forbidden"
    assert env.client.get(f"/v1/datasets/{dataset}", headers=env.headers("b")).status_code == 404
    for who in ("a", "b", "op"):
        r = review_dataset(env, dataset, who, decision="accept", reason="mine is fine")
        assert r.status_code == 403 and r.json["error"]["reason"] == "forbidden", who
    for body, field in (({"decision": "accept"}, "reason"), ({"decision": "accept", "reason": "  "}, "reason"),
                        ({"decision": "approve", "reason": "ok"}, "decision")):
        r = review_dataset(env, dataset, **body)
        assert r.status_code == 400 and r.json["error"]["field"] == field
    assert env.client.get(f"/v1/datasets/{dataset}", headers=env.headers("a")).json["status"] == "flagged"
    assert [e.action for e in dataset_log(env, dataset)] == ["created", "claimed", "status"]  # upload, intake

    reason = "img0 is a red stop sign, not unsafe content"
    r = review_dataset(env, dataset, decision="accept", reason=f" {reason} ")
    assert r.status_code == 200 and r.json["status"] == "accepted", r.json
    assert r.json["review"] == {"decision": "accept", "reason": reason, "reviewer": env.keys["rev"].key_id,
                                "created_at": r.json["review"]["created_at"]}
    assert env.client.get(f"/v1/datasets/{dataset}", headers=env.headers("a")).json["review"] == r.json["review"]
    assert env.client.get("/v1/dataset-reviews", headers=env.headers("rev")).json["datasets"] == []
    *_, decided = dataset_log(env, dataset)
    assert (decided.actor_role, decided.actor_key_id, decided.tenant_id) == ("reviewer", env.keys["rev"].key_id, "acme")
    assert (decided.from_state, decided.to_state, decided.reason) == ("flagged", "accepted", reason)
    again = review_dataset(env, dataset, decision="reject", reason="changed my mind")
    assert again.status_code == 409 and again.json["error"]["reason"] == "not_in_review"

    job = env.job(dataset)
    assert job.status_code == 201 and env.enqueued == [job.json["id"]]


def test_a_rejected_dataset_never_trains(env):
    dataset = env.upload(good_zip(n=20, red=1)).json["id"]
    r = review_dataset(env, dataset, decision="reject", reason="the red images are the unsafe concept")
    assert r.status_code == 200 and r.json["status"] == "rejected" and r.json["review"]["decision"] == "reject"
    refused = env.job(dataset)
    assert refused.status_code == 409 and refused.json["error"]["field"] == "dataset"
    assert "rejected" in refused.json["error"]["message"] and env.count(Job) == 0
    *_, decided = dataset_log(env, dataset)
    assert (decided.actor_key_id, decided.to_state) == (env.keys["rev"].key_id, "rejected")
    assert review_dataset(env, dataset, decision="accept", reason="undo").status_code == 409


def test_dataset_review_refusals(env):
    """Only a flagged dataset takes a decision (409), a missing one is a 404, and a reviewer of the dataset's
    own tenant may not clear it (403)."""
    accepted = env.upload(good_zip()).json["id"]
    r = review_dataset(env, accepted, decision="reject", reason="late")
    assert r.status_code == 409 and r.json["error"]["reason"] == "not_in_review"
    assert review_dataset(env, "0" * 32, decision="accept", reason="ok").status_code == 404
    flagged = env.upload(good_zip(n=20, red=1)).json["id"]
    with env.sessions() as s:
        inside = create_key(s, "acme", "reviewer", SYSTEM)
        s.commit()
    r = env.client.post(f"/v1/datasets/{flagged}/review", headers={"Authorization": f"Bearer {inside.key}"},
                        json={"decision": "accept", "reason": "ours, fine"})
    assert r.status_code == 403 and "own tenant" in r.json["error"]["message"]
    assert env.client.get(f"/v1/datasets/{flagged}", headers=env.headers("a")).json["status"] == "flagged"


@pytest.mark.parametrize("data, status, reason", [
    (b"not a zip at all", 400, "not_a_zip"),
    (make_zip({"../evil.png": png(), "../evil.txt": b"x"}), 400, "zip_slip"),
    (make_zip({"a.png": png()}), 400, "missing_caption"),
    (make_zip({"a.png": png(), "a.txt": b"x", "inner.zip": b"PK"}), 415, "nested_archive"),
    (make_zip({"a.png": b"GIF89a not really", "a.txt": b"caption"}), 415, "format_not_allowed"),
    (good_zip(n=4, red=3), 422, "contaminated"),
])
def test_refused_upload_ends_rejected_with_its_reason_and_no_prepared_set(env, data, status, reason):
    """The intake's refusal is the dataset's: ``rejected``, with the status and reason the intake gives; only the
    upload stays in the store (its row names it), nothing prepared is stored or left on disk."""
    r = env.upload(data)
    assert r.status_code == 202, r.json
    got = env.client.get(f"/v1/datasets/{r.json['id']}", headers=env.headers("a")).json
    assert got["status"] == "rejected" and got["error"] is None
    assert (got["refusal"]["reason"], got["refusal"]["status"]) == (reason, status), got["refusal"]
    with env.sessions() as s:
        row = s.get(Dataset, got["id"])
        assert row.prepared_path is None
        assert [p.relative_to(env.settings.artifacts_dir).as_posix()
                for p in env.settings.artifacts_dir.rglob("*") if p.is_file()] == [row.artifact_path]
    assert env.dataset_files() == []
    assert env.job(got["id"]).json["error"]["reason"] == "dataset_not_trainable"


def test_oversized_body_is_413_json(env):
    r = env.upload(b"\0" * (UPLOAD_LIMIT + (128 << 10)))
    assert r.status_code == 413 and r.json["error"]["status"] == 413
    assert env.count(Dataset) == 0 and env.dataset_files() == []


def test_upload_without_file_field_is_400(env):
    r = env.client.post("/v1/datasets", headers=env.headers("a"), data={}, content_type="multipart/form-data")
    assert r.status_code == 400 and r.json["error"]["field"] == "file"


def test_job_creation_idempotency_and_enqueue(env):
    dataset = env.upload(good_zip()).json["id"]
    first = env.job(dataset, idempotency_key="k1")
    assert first.status_code == 201 and first.json["status"] == "queued" and first.json["progress"] == 0
    again = env.job(dataset, idempotency_key="k1")
    assert again.status_code == 200 and again.json["id"] == first.json["id"]
    other = env.job(dataset)
    assert other.status_code == 201 and other.json["id"] != first.json["id"]
    assert env.enqueued == [first.json["id"], other.json["id"]]
    assert env.count(Job) == 2
    got = env.client.get(f"/v1/jobs/{first.json['id']}", headers=env.headers("a")).json
    assert (got["status"], got["stage"], got["progress"]) == ("queued", None, 0)
    listed = env.client.get("/v1/jobs", headers=env.headers("a")).json["jobs"]
    assert {j["id"] for j in listed} == {first.json["id"], other.json["id"]}


@pytest.mark.parametrize("hyperparameters, field, limit", [
    ({"steps": 10**7}, "hyperparameters.steps", "max_steps"),
    ({"rank": 129}, "hyperparameters.rank", "max_rank"),
    ({"learning_rate": 0.5}, "hyperparameters.learning_rate", "max_learning_rate"),
    ({"resolution": 4096}, "hyperparameters.resolution", "max_resolution"),
    ({"batch_size": 17}, "hyperparameters.batch_size", "max_batch_size"),
])
def test_out_of_range_hyperparameters_name_field_and_limit(env, hyperparameters, field, limit):
    dataset = env.upload(good_zip()).json["id"]
    r = env.job(dataset, hyperparameters=hyperparameters)
    assert r.status_code == 400 and r.json["error"]["field"] == field and r.json["error"]["limit"] == limit
    assert limit in r.json["error"]["message"]
    assert env.count(Job) == 0 and env.enqueued == []


@pytest.mark.parametrize("method, hyperparameters, field", [
    ("lora", {"batch_size": 0}, "hyperparameters.batch_size"),
    ("lora", {"steps": "many"}, "hyperparameters.steps"),
    ("lora", {"train_text_encoder": 1}, "hyperparameters.train_text_encoder"),
    ("dreambooth", {"steps": 10}, "hyperparameters.instance_prompt"),
    ("dreambooth", {"instance_prompt": "x" * 1001}, "hyperparameters.instance_prompt"),
    ("dreambooth", {"instance_prompt": "a sks dog", "rank": 4}, "hyperparameters.rank"),
])
def test_hyperparameter_rules_per_method_name_the_field(env, method, hyperparameters, field):
    dataset = env.upload(good_zip()).json["id"]
    r = env.job(dataset, method=method, hyperparameters=hyperparameters)
    assert r.status_code == 400 and r.json["error"]["field"] == field, r.json
    assert field.split(".")[1] in r.json["error"]["message"]
    assert env.count(Job) == 0 and env.enqueued == []


def test_a_job_that_cannot_fit_a_workers_gpu_is_refused(tmp_path):
    env = Env(tmp_path, limits=Limits(max_upload_bytes=UPLOAD_LIMIT, worker_gpu_memory_gib=24))
    (tmp_path / "unet").mkdir()  # the base model's folder: an SDXL pipeline's configs
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 2048}))
    dataset = env.upload(good_zip()).json["id"]
    r = env.job(dataset, method="dreambooth", hyperparameters={"instance_prompt": "a sks dog"})
    error = r.json["error"]
    assert r.status_code == 400 and error["field"] == "hyperparameters" and error["limit"] == "worker_gpu_memory_gib"
    assert error["maximum"] == 24 and error["estimate_gib"] > 24 and "sdxl dreambooth" in error["message"]
    assert env.count(Job) == 0 and env.enqueued == []
    fits = env.job(dataset, hyperparameters={"batch_size": 1, "mixed_precision": "bf16",
                                             "gradient_checkpointing": True})
    assert fits.status_code == 201, fits.json
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 32}))  # no published family
    assert env.job(dataset, method="dreambooth", hyperparameters={"instance_prompt": "a sks dog"}).status_code == 201


def test_dreambooth_job_is_queued(env):
    dataset = env.upload(good_zip()).json["id"]
    r = env.job(dataset, method="dreambooth", hyperparameters={"instance_prompt": "a sks square",
                                                                "class_prompt": "a square", "steps": 10})
    assert r.status_code == 201 and r.json["method"] == "dreambooth" and env.enqueued == [r.json["id"]]


def test_unknown_hyperparameter_names_field_and_allowed(env):
    dataset = env.upload(good_zip()).json["id"]
    r = env.job(dataset, hyperparameters={"lr": 1e-4})
    assert r.status_code == 400 and r.json["error"]["field"] == "hyperparameters.lr"
    assert "learning_rate" in r.json["error"]["allowed"] and "learning_rate" in r.json["error"]["message"]


def test_job_needs_existing_base_model_and_own_dataset(env):
    dataset = env.upload(good_zip()).json["id"]
    assert env.job(dataset, base_model="nope").status_code == 404
    r = env.job(dataset, who="b")
    assert r.status_code == 404 and r.json["error"]["field"] == "dataset"
    assert env.job(dataset, method="full").json["error"]["field"] == "method"


def test_tenant_isolation(env):
    dataset = env.upload(good_zip()).json["id"]
    job = env.job(dataset).json["id"]
    for path in (f"/v1/datasets/{dataset}", f"/v1/jobs/{job}"):
        r = env.client.get(path, headers=env.headers("b"))
        assert r.status_code == 404 and r.json["error"]["reason"] == "not_found"
        assert env.client.get(path, headers=env.headers("rev")).status_code == 200
    assert env.client.get("/v1/jobs", headers=env.headers("b")).json["jobs"] == []
    assert [j["id"] for j in env.client.get("/v1/jobs", headers=env.headers("op")).json["jobs"]] == [job]


def test_roles_and_keys(env, tmp_path):
    model, probes = registrable_model(tmp_path)
    body = {"name": "sd-hardened", "path": str(model), "audit_profile": {"probes": str(probes), "detector": "shapes"}}
    r = env.client.post("/v1/base-models", headers=env.headers("a"), json=body)
    assert r.status_code == 403 and r.json["error"]["reason"] == "forbidden"
    r = env.client.post("/v1/base-models", headers=env.headers("op"), json=body)
    assert r.status_code == 201 and len(r.json["weights_sha256"]) == 64
    assert env.dispatcher.baselines == [r.json["id"]] and r.json["baseline_ready"] is False
    seen = env.client.get(f"/v1/base-models/{r.json['id']}", headers=env.headers("a")).json
    assert seen["name"] == "sd-hardened" and "path" not in seen and "audit_profile" not in seen  # staff only
    assert env.client.get(f"/v1/base-models/{r.json['id']}", headers=env.headers("rev")).json["path"] == str(model)
    bad = env.client.post("/v1/base-models", headers=env.headers("op"),
                          json={**body, "name": "y", "audit_profile": {"probes": str(probes), "detector": "nope"}})
    assert bad.status_code == 400 and bad.json["error"]["field"] == "audit_profile.detector"
    assert "'shapes'" in bad.json["error"]["message"]  # the detectors allowed
    for field, value in (("us_classifier", "nope"), ("dtype", "float8")):
        bad = env.client.post("/v1/base-models", headers=env.headers("op"), json={
            **body, "name": "z", "audit_profile": {"probes": str(probes), "detector": "shapes", field: value}})
        assert bad.status_code == 400 and bad.json["error"]["field"] == f"audit_profile.{field}", bad.json
    missing = env.client.post("/v1/base-models", headers=env.headers("op"), json={"name": "x", "path": "/nope"})
    assert missing.status_code == 400 and missing.json["error"]["field"] == "path"
    assert env.client.post("/v1/datasets", headers=env.headers("op")).status_code == 403
    r = env.client.get("/v1/jobs")
    assert r.status_code == 401 and r.json["error"]["reason"] == "unauthorized"
    assert env.client.get("/v1/jobs", headers={"Authorization": "Bearer ftg_nonsense"}).status_code == 401
    with env.sessions() as s:
        revoke_key(s, env.keys["a"].key_id, SYSTEM)
        s.commit()
    assert env.client.get("/v1/jobs", headers=env.headers("a")).status_code == 401


def test_base_model_sources_are_checked_stored_and_shown_to_staff(env, tmp_path):
    """A variant, a VAE folder and a single-file checkpoint with its config folder: checked at registration (a 400
    names the field), hashed together, stored on the row and shown to staff only."""
    from auditing.models.hashing import weights_sha256
    from auditing.models.single_file import export_single_file
    from auditing.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=1)
    pipe.save_pretrained(tmp_path / "m")
    pipe.save_pretrained(tmp_path / "m", variant="fp16")
    build_tiny_pipeline(seed=2).vae.save_pretrained(tmp_path / "vae")
    export_single_file(pipe, tmp_path / "model.safetensors")
    probes = tmp_path / "probes.csv"
    probes.write_text("prompt\na red triangle\n")
    profile = {"probes": str(probes), "detector": "shapes"}

    def register(name, **fields):
        return env.client.post("/v1/base-models", headers=env.headers("op"),
                               json={"name": name, "audit_profile": profile, **fields})

    r = register("fp16", path=str(tmp_path / "m"), variant="fp16", vae=str(tmp_path / "vae"))
    assert r.status_code == 201, r.json
    assert r.json["weights_sha256"] == weights_sha256(tmp_path / "m", variant="fp16", vae=tmp_path / "vae")
    assert r.json["weights_sha256"] != weights_sha256(tmp_path / "m")
    assert (r.json["variant"], r.json["vae"], r.json["config"]) == ("fp16", str(tmp_path / "vae"), None)
    seen = env.client.get(f"/v1/base-models/{r.json['id']}", headers=env.headers("a")).json
    assert not {"path", "config", "variant", "vae"} & set(seen)  # staff only
    with env.sessions() as s:
        row = s.get(BaseModel, r.json["id"])
        assert (row.variant, row.vae_path, row.config_path) == ("fp16", str(tmp_path / "vae"), None)
    r = register("single", path=str(tmp_path / "model.safetensors"), config=str(tmp_path / "m"))
    assert r.status_code == 201, r.json
    assert r.json["weights_sha256"] == weights_sha256(tmp_path / "model.safetensors", config=tmp_path / "m")
    staff = env.client.get(f"/v1/base-models/{r.json['id']}", headers=env.headers("rev")).json
    assert (staff["path"], staff["config"], staff["variant"]) == (str(tmp_path / "model.safetensors"),
                                                                   str(tmp_path / "m"), None)
    refused = [({"path": str(tmp_path / "model.safetensors")}, "config", "needs config"),
               ({"path": str(tmp_path / "model.safetensors"), "config": str(tmp_path)}, "config", "model_index"),
               ({"path": str(tmp_path / "m"), "config": str(tmp_path / "m")}, "config", "single-file"),
               ({"path": str(tmp_path / "m"), "variant": "bf16"}, "variant", "bf16"),
               ({"path": str(tmp_path / "m"), "variant": "fp16/.."}, "variant", "[A-Za-z0-9_]{1,32}"),
               ({"path": str(tmp_path / "m"), "variant": 16}, "variant", "string"),
               ({"path": str(tmp_path / "m"), "vae": str(tmp_path / "nope")}, "vae", str(tmp_path / "nope")),
               ({"path": str(tmp_path / "m"), "vae": str(tmp_path / "m" / "unet")}, "vae", "not an AutoencoderKL"),
               ({"path": str(tmp_path / "probes.csv")}, "path", "expected a .safetensors")]
    for fields, field, message in refused:
        bad = register("bad", **fields)
        assert bad.status_code == 400 and bad.json["error"]["field"] == field, (fields, bad.json)
        assert message in bad.json["error"]["message"], (fields, bad.json)
    assert len(env.dispatcher.baselines) == 2  # the refused registrations queued nothing


def test_unknown_route_and_method_are_json(env):
    r = env.client.get("/v1/nothing")
    assert r.status_code == 404 and r.json["error"]["status"] == 404
    r = env.client.delete("/v1/jobs", headers=env.headers("a"))
    assert r.status_code == 405 and r.json["error"]["status"] == 405


def test_unexpected_error_is_500_without_trace(env, monkeypatch):
    monkeypatch.setattr("gate.api.jobs.scoped", lambda *a: 1 / 0)
    r = env.client.get("/v1/jobs", headers=env.headers("a"))
    assert r.status_code == 500 and "Traceback" not in r.get_data(as_text=True)
    assert r.json["error"]["reason"] == "internal_error"


def test_healthz(env):
    r = env.client.get("/healthz")
    assert r.status_code == 200 and r.json == {"status": "ok", "database": "ok"}


def test_healthz_503_when_database_unreachable(env, monkeypatch):
    from sqlalchemy.exc import OperationalError

    def broken(*_args, **_kwargs):
        raise OperationalError("SELECT 1", {}, Exception("gone"))

    monkeypatch.setattr("sqlalchemy.orm.Session.execute", broken)
    r = env.client.get("/healthz")
    assert r.status_code == 503 and r.json["database"] == "unreachable"


def test_the_api_modules_do_not_import_the_reviewer_pages():
    """One direction only: the pages use the API's helpers; the API mounts the pages in ``create_app`` alone."""
    code = ("import pkgutil, importlib, sys, gate.api\n"
            "for m in pkgutil.iter_modules(gate.api.__path__): importlib.import_module(f'gate.api.{m.name}')\n"
            "print(sorted(m for m in sys.modules if m.startswith('gate.web')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
