"""The S3-compatible artifact store (``gate.storage.s3``) against a real S3 wire-protocol server: moto's server
mode, started on 127.0.0.1 by the test (what it does not model: docs/gate-storage.md, *S3-compatible store*)."""

from __future__ import annotations

import io
import time

import boto3
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import select
from test_pipeline import job_id  # noqa: F401  (a queued job on the world, on this module's ``rt``)

from gate.pipeline import audit, train, verdict
from gate.pipeline.runtime import Runtime
from gate.settings import Settings, SettingsError
from gate.storage.artifacts import ArtifactTooLarge
from gate.storage.db import make_engine, session_factory, upgrade
from gate.storage.models import Artifact
from gate.storage.s3 import S3ArtifactStore
from gate.storage.sweep import Swept, sweep

BUCKET = "ftgate-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def client(s3_endpoint, monkeypatch):
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    yield s3
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=BUCKET, Key=item["Key"])
    s3.delete_bucket(Bucket=BUCKET)


@pytest.fixture
def store(client, tmp_path) -> S3ArtifactStore:
    return S3ArtifactStore(BUCKET, tmp_path / "cache", prefix="gate-a", client=client)


def objects(client) -> list[str]:
    return sorted(item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                  for item in page.get("Contents", []))


def test_content_addressed_deduplicated_and_read_through_a_checked_cache(store, client):
    first = store.put("acme", io.BytesIO(b"weights"), suffix=".safetensors")
    assert first.key == f"tenants/acme/sha256/{first.sha256[:2]}/{first.sha256}.safetensors"
    assert objects(client) == [f"gate-a/{first.key}"]  # under the prefix; no temporary object left
    assert store.put("acme", io.BytesIO(b"weights"), suffix=".safetensors") == first
    assert objects(client) == [f"gate-a/{first.key}"]
    assert store.exists("acme", first.sha256, ".safetensors") and not store.exists("acme", first.sha256)
    assert store.path("acme", first.key).read_bytes() == b"weights" and store.verify("acme", first.key)


def test_an_object_changed_in_the_bucket_is_never_used(store, client, tmp_path):
    stored = store.put("acme", io.BytesIO(b"weights"))
    client.put_object(Bucket=BUCKET, Key=f"gate-a/{stored.key}", Body=b"tampered")
    assert not store.verify("acme", stored.key)
    with pytest.raises(ValueError, match="does not hash to the sha256 its key names"):
        store.path("acme", stored.key)
    assert not list((tmp_path / "cache").rglob("*.safetensors")) and not any(
        p.is_file() for p in (tmp_path / "cache").rglob("*"))  # nothing half-written or wrong kept


def test_oversized_put_leaves_nothing(store, client):
    with pytest.raises(ArtifactTooLarge, match="limit of 10 bytes"):
        store.put("acme", io.BytesIO(b"x" * 11), max_bytes=10)
    assert objects(client) == []
    assert store.put("acme", io.BytesIO(b"x" * 10), max_bytes=10).size_bytes == 10


def test_tenants_cannot_reach_each_others_objects(store):
    theirs = store.put("globex", io.BytesIO(b"secret weights"))
    with pytest.raises(ValueError, match="not an artifact key of tenant 'acme'"):
        store.path("acme", theirs.key)
    with pytest.raises(ValueError, match="not an artifact key of tenant 'acme'"):
        store.delete("acme", theirs.key)
    with pytest.raises(ValueError, match="not an artifact key of tenant 'acme'"):
        store.verify("acme", theirs.key)
    assert not store.exists("acme", theirs.sha256)
    with pytest.raises(ValueError, match="tenant id must match"):
        store.put("../globex", io.BytesIO(b"x"))


def test_a_put_of_stored_bytes_renews_the_object_and_the_sweep_keeps_named_ones(store, client, tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/ftgate.db")
    upgrade(engine)
    sessions = session_factory(engine)
    named = store.put("acme", io.BytesIO(b"named"), suffix=".safetensors")
    orphan = store.put("acme", io.BytesIO(b"orphan"), suffix=".safetensors")
    client.put_object(Bucket=BUCKET, Key="gate-a/tenants/acme/tmp/put-x.partial", Body=b"cut off")
    before = dict(store.stored_files())[named.key]
    time.sleep(1.1)  # S3 times have a resolution of a second
    store.put("acme", io.BytesIO(b"named"), suffix=".safetensors")
    assert dict(store.stored_files())[named.key] > before
    assert [name for name, _ in store.partial_files()] == ["tenants/acme/tmp/put-x.partial"]
    with sessions() as session:
        from test_storage import _job

        session.add(Artifact(tenant_id="acme", job=_job(session), kind="lora", sha256=named.sha256, path=named.key,
                             size_bytes=5))
        session.commit()
        assert session.scalars(select(Artifact)).one().path == named.key
    assert sweep(store, sessions) == Swept(0, 0)  # everything is younger than the grace period
    swept = sweep(store, sessions, grace_s=-60)  # as if an hour had passed
    assert (swept.unreferenced, swept.partial) == (1, 1)
    assert objects(client) == [f"gate-a/{named.key}"] and not store.exists("acme", orphan.sha256)


@pytest.fixture
def rt(tmp_path, s3_endpoint, client) -> Runtime:
    """The pipeline's runtime with its artifact store in the bucket (``artifact_store``), as on several hosts."""
    state = tmp_path / "state"
    settings = Settings(state_dir=state, database_url=f"sqlite:///{tmp_path / 'ftgate.db'}", broker_url=None,
                        artifacts_dir=state / "artifacts", lease_seconds=30,
                        artifact_store=f"s3://{BUCKET}/gate-b", s3_endpoint_url=s3_endpoint)
    upgrade(settings.database_url)
    rt = Runtime.open(settings)
    yield rt
    rt.engine.dispose()


@pytest.mark.slow
def test_a_job_is_trained_audited_and_decided_with_its_files_in_the_bucket(rt, job_id, client):  # noqa: F811
    assert isinstance(rt.store, S3ArtifactStore)
    assert train.train(rt, job_id, "w1/a") and audit.audit(rt, job_id, "w1/b")
    assert verdict.decide(rt, job_id) in ("released", "review", "withheld")
    stored = objects(client)
    assert {"html", "json", "safetensors"} <= {k.rpartition(".")[2] for k in stored}, stored
    assert all(k.startswith(("gate-b/tenants/acme/sha256/", "gate-b/tenants/platform/sha256/")) for k in stored)
    assert not (rt.settings.artifacts_dir).exists()  # nothing went to the folder store
    with rt.sessions() as s:
        artifact = s.scalars(select(Artifact)).one()
    assert rt.store.verify("acme", artifact.path)


def test_a_baseline_in_the_bucket_serves_another_host_without_rendering(tmp_path, s3_endpoint, client, monkeypatch):
    from test_baselines import register_world

    database = f"sqlite:///{tmp_path / 'ftgate.db'}"
    upgrade(database)
    a, b = (Runtime.open(Settings(state_dir=tmp_path / name, database_url=database, broker_url=None,
                                  artifacts_dir=tmp_path / name / "artifacts", artifact_store=f"s3://{BUCKET}/gate-c",
                                  s3_endpoint_url=s3_endpoint)) for name in ("a", "b"))
    base_id = register_world(a, tmp_path)
    first = audit.ensure_baseline(a, base_id)

    def no_render(*args, **kwargs):
        raise AssertionError("the second host audited the baseline again")

    monkeypatch.setattr(audit, "audit_base", no_render)
    assert audit.ensure_baseline(b, base_id) == first
    assert {k.rpartition(".")[2] for k in objects(client) if k.startswith("gate-c/tenants/platform/sha256/")} == {
        "json", "html"}
    for rt in (a, b):
        rt.engine.dispose()


@pytest.mark.parametrize(("changes", "field"), [
    ({"artifact_store": "gs://bucket"}, "artifact_store"), ({"artifact_store": "s3://"}, "artifact_store"),
    ({"artifact_store": "s3://b?region=x"}, "artifact_store"), ({"s3_endpoint_url": "ftp://x"}, "s3_endpoint_url"),
])
def test_bad_store_settings_name_the_field(tmp_path, changes, field):
    with pytest.raises(SettingsError) as caught:
        Settings(state_dir=tmp_path, database_url="sqlite:///x.db", broker_url=None, artifacts_dir=tmp_path / "a",
                 **changes)
    assert caught.value.field == field


def test_the_store_settings_are_read_from_the_environment(tmp_path):
    from gate.settings import load_settings

    settings = load_settings(env={"FTGATE_STATE_DIR": str(tmp_path), "FTGATE_ARTIFACT_STORE": "s3://gate/prod",
                                  "FTGATE_S3_ENDPOINT_URL": "https://s3.example.net"})
    assert (settings.artifact_store, settings.s3_endpoint_url) == ("s3://gate/prod", "https://s3.example.net")
