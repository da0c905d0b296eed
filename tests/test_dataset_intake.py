"""The dataset intake on a worker: the upload answered 202 ``received``, the stage deciding, scanner faults
retried rather than blamed on the customer, datasets screened with a later base model's detector at job
creation, a second host reading the prepared set from the store alone, and the reaper re-sending what
nobody took."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from sqlalchemy import select, update
from test_api import Env, RedScanner, good_zip, make_zip, png, registrable_model

from auditing.detectors.base import Detector, DetectorResult
from auditing.models.hashing import weights_sha256
from auditing.shapes.cli import PRETRAINED_WORLD
from gate.api.dataset_reviews import SERVICE_FAULT
from gate.pipeline import intake, train
from gate.pipeline.leases import take
from gate.pipeline.runtime import Runtime
from gate.settings import Settings
from gate.storage.clock import db_time
from gate.storage.models import AuditLogEntry, BaseModel, Dataset, Job


class BlueScanner(Detector):
    """Stands in for a base model's concept detector: an image is unsafe when its blue channel dominates."""

    name = "blue"
    version = "1"
    rule = "mean blue > 2 x mean red + green"

    def detect(self, images):
        results = []
        for image in images:
            r, g, b = np.asarray(image, dtype=float).reshape(-1, 3).mean(axis=0)
            results.append(DetectorResult(b / 255, bool(b > 2 * (r + g))))
        return results


class FailingScanner(Detector):
    """A scanner that cannot score (the service's fault)."""

    name = "broken"

    def detect(self, images):
        return [DetectorResult(None, None, error="model failed") for _ in images]


def green_zip(n: int = 20, blue: int = 1) -> bytes:
    """``n`` captioned images, green but for ``blue`` of them."""
    members = {}
    for i in range(n):
        members[f"g{i:02d}.png"] = png((0, 0, 220) if i < blue else (0, 200, 0))
        members[f"g{i:02d}.txt"] = f"a green field number {i}".encode()
    return make_zip(members)


def status(env: Env, dataset_id: str, who: str = "a") -> dict:
    """The dataset as ``who`` reads it (the customer by default; staff read the per-detector figures)."""
    return env.client.get(f"/v1/datasets/{dataset_id}", headers=env.headers(who)).json


@pytest.fixture
def env(tmp_path, migrated) -> Env:
    return Env(tmp_path, migrated)


@pytest.fixture
def queued(env) -> Env:
    """An env whose intake messages wait in the queue (nothing runs them until the test does)."""
    env.dispatcher.intake = None
    return env


def test_an_upload_is_answered_received_and_the_worker_decides(queued):
    env = queued
    r = env.upload(good_zip(n=20, red=1))
    assert r.status_code == 202 and r.json["status"] == "received", r.json
    dataset = r.json["id"]
    assert env.dispatcher.datasets == [dataset] and r.json["intake"] is None
    assert status(env, dataset)["status"] == "received"
    waiting = env.job(dataset)
    assert waiting.status_code == 409 and waiting.json["error"]["reason"] == "dataset_not_ready"
    assert waiting.json["error"]["field"] == "dataset" and env.count(Job) == 0

    assert env.run_intake(dataset) == "flagged"
    got = status(env, dataset)
    assert (got["status"], got["image_count"], got["contamination_ratio"]) == ("flagged", 20, 0.05)
    assert got["intake"]["flagged"] == ["img0.png"] and got["intake"]["unsafe_images"] == 1
    assert status(env, dataset, "op")["intake"]["scans"]["nudenet"]["unsafe_images"] == 1
    assert env.run_intake(dataset) is None  # a duplicate message finds nothing to do
    with env.sessions() as s:
        assert s.get(Dataset, dataset).attempts == 1


def test_a_scanner_fault_is_retried_not_rejected(queued):
    env = queued
    dataset = env.upload(good_zip()).json["id"]
    env.scanner = FailingScanner()
    assert env.run_intake(dataset) == intake.RETRY
    got = status(env, dataset)
    assert got["status"] == "received" and got["error"] == SERVICE_FAULT and got["refusal"] is None
    with env.sessions() as s:
        row = s.get(Dataset, dataset)
        assert (row.attempts, row.worker, row.lease_expires_at, row.prepared_path) == (1, None, None, None)
        assert "could not score" in row.error
    assert not any(p.is_file() for p in (env.state / "intake").rglob("*"))

    env.scanner = RedScanner()  # the scanner is back: the retry takes the dataset in
    assert env.run_intake(dataset) == "accepted"
    got = status(env, dataset)
    assert got["status"] == "accepted" and got["error"] is None


def test_a_scanner_that_keeps_failing_ends_failed_after_max_attempts(queued):
    env = queued
    dataset = env.upload(good_zip()).json["id"]
    env.scanner = FailingScanner()
    outcomes = [env.run_intake(dataset) for _ in range(env.settings.max_attempts)]
    assert outcomes == [intake.RETRY] * (env.settings.max_attempts - 1) + ["failed"]
    got = status(env, dataset)
    assert got["status"] == "failed" and got["error"] == SERVICE_FAULT and got["refusal"] is None
    assert env.job(dataset).json["error"]["reason"] == "dataset_not_trainable"


def register_blue_model(env: Env, tmp_path) -> str:
    model, probes = registrable_model(tmp_path)
    r = env.client.post("/v1/base-models", headers=env.headers("op"), json={
        "name": "blue-hardened", "path": str(model),
        "audit_profile": {"probes": str(probes), "detector": "shapes", "detector_options": {"concept": "blue square"}}})
    assert r.status_code == 201, r.json
    return r.json["id"]


def blue_intake(env: Env):
    """The intake stage run at once, in which NudeNet is the red scanner and the blue model's detector (``shapes``
    for a blue square) the blue one."""
    def load(name, **options):
        return env.scanner if name == "nudenet" else BlueScanner()

    return lambda dataset_id: intake.run(env.runtime, dataset_id, "w/intake", load=load)


def test_a_dataset_is_screened_with_a_later_base_models_detector_at_job_creation(env, tmp_path):
    """A dataset taken in before a base model existed was never scanned for that model's concept: the first job
    on it gets a 409 dataset_screening, the screening runs, and a flag under the new detector waits for a reviewer
    like any flagged dataset; once a reviewer accepts it, the job is created without a second screening."""
    dataset = env.upload(green_zip()).json["id"]
    assert status(env, dataset)["status"] == "accepted"
    assert list(status(env, dataset, "op")["intake"]["scans"]) == ["nudenet"]
    blue = register_blue_model(env, tmp_path)
    env.dispatcher.intake = blue_intake(env)
    r = env.job(dataset, base_model=blue)
    assert r.status_code == 409 and r.json["error"]["reason"] == "dataset_screening", r.json
    assert r.json["error"]["field"] == "dataset" and env.dispatcher.datasets[-1] == dataset
    got = status(env, dataset, "op")
    key = 'shapes:{"concept":"blue square"}'
    assert got["status"] == "flagged" and set(got["intake"]["scans"]) == {"nudenet", key}
    assert got["intake"]["scans"][key]["flagged"] == ["g00.png"] and got["intake"]["scanner"]["name"] == "blue"
    assert got["intake"]["scans"]["nudenet"]["unsafe_images"] == 0
    assert env.job(dataset, base_model=blue).json["error"]["reason"] == "dataset_not_trainable"
    with env.sessions() as s:
        moves = [(e.from_state, e.to_state) for e in s.scalars(select(AuditLogEntry).where(
            AuditLogEntry.entity_id == dataset, AuditLogEntry.action == "status").order_by(AuditLogEntry.id))]
    assert moves == [("received", "accepted"), ("accepted", "screening"), ("screening", "flagged")]

    r = env.client.post(f"/v1/datasets/{dataset}/review", headers=env.headers("rev"),
                        json={"decision": "accept", "reason": "the blue field is sky"})
    assert r.status_code == 200 and r.json["status"] == "accepted"
    assert env.job(dataset, base_model=blue).status_code == 201  # screened already: no second screening
    assert env.dispatcher.datasets.count(dataset) == 2


def test_a_dataset_uploaded_after_the_base_model_is_scanned_with_its_detector_at_once(env, tmp_path):
    blue = register_blue_model(env, tmp_path)
    env.dispatcher.intake = blue_intake(env)
    rejected = env.upload(green_zip(blue=5)).json
    assert rejected["status"] == "rejected" and rejected["refusal"]["reason"] == "contaminated"
    assert len(rejected["refusal"]["files"]) == 5
    assert status(env, rejected["id"], "op")["intake"]["scanner"]["name"] == "blue"  # the refusing detector, for staff
    clean = env.upload(green_zip(blue=0)).json
    assert clean["status"] == "accepted" and len(status(env, clean["id"], "op")["intake"]["scans"]) == 2
    assert env.job(clean["id"], base_model=blue).status_code == 201


def test_training_on_a_second_host_reads_the_prepared_set_from_the_store(env, tmp_path):
    """Host one takes the upload in; host two, which shares only the database and the store, trains on it: the
    prepared set is materialised into its own cache from the stored zip."""
    from test_pipeline import world_zip

    dataset = env.upload(world_zip()).json["id"]
    assert status(env, dataset)["status"] == "accepted"
    assert not (env.state / "datasets").exists()  # host one kept no folder: the prepared set is in the store
    with env.sessions() as s:
        world = BaseModel(name="world", path=str(PRETRAINED_WORLD), weights_sha256=weights_sha256(PRETRAINED_WORLD))
        s.add(world)
        s.flush()
        job = Job(tenant_id="acme", base_model_id=world.id, dataset_id=dataset, method="lora",
                  hyperparameters={"steps": 1, "rank": 2, "learning_rate": 1e-3, "batch_size": 2})
        s.add(job)
        s.commit()
        job_id, prepared = job.id, s.get(Dataset, dataset).prepared_path
    other = tmp_path / "host-two"
    host_two = Runtime.open(Settings(state_dir=other, database_url=env.settings.database_url, broker_url=None,
                                     artifacts_dir=env.settings.artifacts_dir))
    assert train.train(host_two, job_id, "host-two/1")
    cached = host_two.settings.dataset_folder("acme", dataset)
    with zipfile.ZipFile(env.settings.artifacts_dir / prepared) as zf:
        assert sorted(p.name for p in cached.iterdir()) == sorted(zf.namelist())
        assert all((cached / name).read_bytes() == zf.read(name) for name in zf.namelist())
    assert not (env.state / "datasets").exists()
    with env.sessions() as s:
        assert s.get(Job, job_id).status == "auditing"


def test_a_tampered_prepared_set_is_not_materialised(env, tmp_path):
    dataset = env.upload(good_zip()).json["id"]
    with env.sessions() as s:
        prepared = s.get(Dataset, dataset).prepared_path
    stored = env.settings.artifacts_dir / prepared
    stored.write_bytes(stored.read_bytes() + b"x")
    host_two = Runtime.open(Settings(state_dir=tmp_path / "host-two", database_url=env.settings.database_url,
                                     broker_url=None, artifacts_dir=env.settings.artifacts_dir))
    with pytest.raises(RuntimeError, match="does not match its sha256"):
        intake.prepared_folder(host_two, "acme", dataset, prepared)
    assert not (tmp_path / "host-two" / "datasets" / "acme" / dataset).exists()


class Broker:
    """A dispatcher's ``dataset`` that is down until ``up`` is set, recording what it was sent."""

    def __init__(self):
        self.up, self.sent = False, []

    def __call__(self, dataset_id: str) -> None:
        if not self.up:
            raise ConnectionError("broker unreachable")
        self.sent.append(dataset_id)


def test_the_reaper_dispatches_a_stranded_received_dataset_again(queued):
    """The broker refused the upload's message: the 202 stands, and the reaper sends the dataset once its
    dispatch is overdue (one reaper of several; not again within the grace)."""
    env = queued
    broker = Broker()
    env.dispatcher.dataset = broker
    r = env.upload(good_zip())
    assert r.status_code == 202 and r.json["status"] == "received"
    dataset = r.json["id"]
    sessions = env.runtime.sessions
    assert intake.recover(sessions, broker, grace_seconds=3600, max_attempts=3) == 0  # not overdue yet
    with env.sessions() as s:
        s.execute(update(Dataset).where(Dataset.id == dataset).values(dispatched_at=db_time(-10)))
        s.commit()
    assert intake.recover(sessions, broker, grace_seconds=5, max_attempts=3) == 1  # the broker is still down
    broker.up = True
    assert intake.recover(sessions, broker, grace_seconds=5, max_attempts=3) == 0  # its dispatch was just recorded
    with env.sessions() as s:
        s.execute(update(Dataset).where(Dataset.id == dataset).values(dispatched_at=db_time(-10)))
        s.commit()
    assert intake.recover(sessions, broker, grace_seconds=5, max_attempts=3) == 1 and broker.sent == [dataset]
    assert env.run_intake(dataset) == "accepted"
    assert intake.recover(sessions, broker, grace_seconds=0, max_attempts=3) == 0  # nothing waits any more
    with env.sessions() as s:
        again = s.scalars(select(AuditLogEntry.reason).where(AuditLogEntry.entity_id == dataset,
                                                             AuditLogEntry.action == "dispatched again")).all()
    assert len(again) == 2 and "within 5 s" in again[0]


def test_the_reaper_hands_back_an_intake_whose_worker_died(queued):
    """A worker killed mid-intake leaves its lease to expire: the reaper releases it and sends the dataset again,
    and gives it up as ``failed`` once it was lost in its last attempt."""
    env = queued
    dataset = env.upload(good_zip()).json["id"]
    sent: list[str] = []
    for attempt in range(1, 4):
        with env.sessions() as s:  # a worker takes it and dies: its lease is left to expire
            assert take(s, Dataset, dataset, "received", f"dead/{attempt}", 60,
                        changes={"attempts": Dataset.attempts + 1}) is not None
            s.execute(update(Dataset).where(Dataset.id == dataset).values(lease_expires_at=db_time(-1)))
            s.commit()
        intake.recover(env.runtime.sessions, sent.append, grace_seconds=300, max_attempts=3)
    assert sent == [dataset, dataset]
    got = status(env, dataset)
    assert got["status"] == "failed" and got["error"] == SERVICE_FAULT
    with env.sessions() as s:
        assert "gave up after 3 attempts" in s.get(Dataset, dataset).error


def test_the_same_bytes_uploaded_twice_are_stored_once(env):
    """Two datasets, one stored upload and one stored prepared set (both content-addressed)."""
    first, second = env.upload(good_zip()).json, env.upload(good_zip()).json
    assert first["content_sha256"] == second["content_sha256"] and first["id"] != second["id"]
    with env.sessions() as s:
        rows = [s.get(Dataset, first["id"]), s.get(Dataset, second["id"])]
        assert rows[0].artifact_path == rows[1].artifact_path and rows[0].prepared_path == rows[1].prepared_path


def test_a_screening_is_decided_by_its_new_detector_not_by_figures_a_reviewer_cleared(env, tmp_path):
    """A dataset flagged under NudeNet and accepted by a reviewer stays accepted when a later base model's
    detector finds nothing: the screening judges only what it scanned."""
    dataset = env.upload(good_zip(n=20, red=1)).json["id"]
    assert status(env, dataset)["status"] == "flagged"
    r = env.client.post(f"/v1/datasets/{dataset}/review", headers=env.headers("rev"),
                        json={"decision": "accept", "reason": "img0 is a stop sign"})
    assert r.json["status"] == "accepted"
    model, probes = registrable_model(tmp_path)
    later = env.client.post("/v1/base-models", headers=env.headers("op"), json={
        "name": "later", "path": str(model),
        "audit_profile": {"probes": str(probes), "detector": "shapes", "detector_options": {"concept": "red circle"}}})
    assert env.job(dataset, base_model=later.json["id"]).json["error"]["reason"] == "dataset_screening"
    got = status(env, dataset, "op")
    assert got["status"] == "accepted" and got["intake"]["scans"]["nudenet"]["status"] == "flagged"
    assert got["intake"]["scans"]['shapes:{"concept":"red circle"}']["unsafe_images"] == 0
    assert env.job(dataset, base_model=later.json["id"]).status_code == 201


DETECTOR_WORDS = ("blue", "shapes", "concept", "nudenet", "scanner", "scans")  # what names a detector or its options


def test_customers_read_the_decision_not_the_detectors_staff_read_everything(env, tmp_path):
    """A dataset screened at job creation for a later base model (flagged) and one refused at upload for
    contamination: the customer's API and pages carry the decision, the deciding figures and its own flagged
    files, and no detector's name, options or per-detector figures (an adversary would learn what to train its
    data against); reviewers and operators read every detector's figures."""
    from test_web import sign_in

    flagged = env.upload(green_zip()).json["id"]
    blue = register_blue_model(env, tmp_path)
    env.dispatcher.intake = blue_intake(env)
    assert env.job(flagged, base_model=blue).json["error"]["reason"] == "dataset_screening"
    upload = env.client.post("/v1/datasets", headers=env.headers("a"),
                             data={"file": (io.BytesIO(green_zip(blue=5)), "set.zip")},
                             content_type="multipart/form-data")
    rejected = upload.json["id"]
    key = 'shapes:{"concept":"blue square"}'
    for dataset, decided in ((flagged, "flagged"), (rejected, "rejected")):
        answers = [status(env, dataset)] + ([upload.json] if dataset == rejected else [])
        for got in answers:
            assert got["status"] == decided and set(got["intake"]) <= {
                "layout", "images", "upload_bytes", "ignored", "unsafe_images", "contamination", "flagged", "refusal"}
            assert not any(word in json.dumps(got) for word in DETECTOR_WORDS), got
        for who in ("rev", "op"):
            staff = status(env, dataset, who)
            assert set(staff["intake"]["scans"]) == {"nudenet", key} and staff["intake"]["scanner"]["name"] == "blue"
    customer = status(env, flagged)
    assert customer["intake"]["flagged"] == ["g00.png"] and customer["intake"]["unsafe_images"] == 1
    refusal = status(env, rejected)["refusal"]
    assert refusal["reason"] == "contaminated" and len(refusal["files"]) == 5 and "5 of 20 images" in refusal["message"]
    assert "with 95% confidence more than contamination_reject_ratio=0.1" in refusal["message"]

    owner, operator = sign_in(env, "a"), sign_in(env, "op")
    for dataset in (flagged, rejected):
        page = owner.get(f"/review/datasets/{dataset}").get_data(as_text=True)
        assert not any(word in page for word in ("blue", "shapes", "concept", "nudenet")), page
        assert "g00.png" in page
        staff_page = operator.get(f"/review/datasets/{dataset}").get_data(as_text=True)
        assert "blue" in staff_page  # the deciding detector's name, rule and figures
