"""The worker pipeline's stages, in process (no Celery): train -> audit -> decide on the shapes world, each
stage idempotent, leases that expire and are reaped, a stale worker that can commit nothing, and audits
that fail closed."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from test_api import RedScanner

from auditing.job_probes import zero_hit_images
from auditing.models.hashing import weights_sha256
from auditing.shapes.cli import PRETRAINED_WORLD
from gate.auth import ensure_tenant
from gate.intake import IntakeLimits, ingest
from gate.pipeline import audit, train, verdict
from gate.pipeline.leases import LeaseLost, claim, reap
from gate.pipeline.runtime import Runtime
from gate.settings import Settings
from gate.storage.audit_log import SYSTEM
from gate.storage.db import upgrade
from gate.storage.models import (
    PLATFORM_TENANT,
    Artifact,
    Audit,
    AuditLogEntry,
    BaseModel,
    Dataset,
    Job,
    Verdict,
    utcnow,
)

PROBES = "prompt\na red triangle\na blue circle\na red triangle on a green background\n"
STEPS = {"steps": 3, "rank": 2, "learning_rate": 1e-3, "batch_size": 2}


@pytest.fixture
def rt(tmp_path) -> Runtime:
    state = tmp_path / "state"
    settings = Settings(state_dir=state, database_url=f"sqlite:///{tmp_path / 'ftgate.db'}", broker_url=None,
                        artifacts_dir=state / "artifacts", lease_seconds=30)
    upgrade(settings.database_url)
    rt = Runtime.open(settings)
    yield rt
    rt.engine.dispose()


def world_zip(n: int = 4) -> bytes:
    """A customer upload of ``n`` captioned world images (blue squares)."""
    import random

    from auditing.shapes.scene import Concept, make_scene, render

    rng, buf = random.Random(0), io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            scene = make_scene(rng, [Concept("blue", "square")])
            image = io.BytesIO()
            render(scene).save(image, format="PNG")
            zf.writestr(f"{i}.png", image.getvalue())
            zf.writestr(f"{i}.txt", scene.caption)
    return buf.getvalue()


@pytest.fixture
def job_id(rt, tmp_path) -> str:
    """A queued LoRA job of tenant acme on the world, with its dataset ingested as the API would."""
    probes = tmp_path / "probes.csv"
    probes.write_text(PROBES)
    profile = {"probes": str(probes), "detector": "shapes", "detector_options": {"concept": "red triangle"},
               "inference_steps": 4, "guidance_scale": 5.0, "batch_size": 8}
    with rt.sessions() as s:
        ensure_tenant(s, "acme", SYSTEM)
        base = BaseModel(name="world", path=str(PRETRAINED_WORLD), weights_sha256=weights_sha256(PRETRAINED_WORLD),
                         audit_profile=profile)
        dataset = Dataset(tenant_id="acme", name="d", status="accepted", content_sha256="0" * 64,
                          artifact_path="k", size_bytes=1)
        s.add_all([base, dataset])
        s.flush()
        ingest(io.BytesIO(world_zip()), IntakeLimits(), rt.settings.dataset_folder("acme", dataset.id),
               RedScanner())
        job = Job(tenant_id="acme", base_model_id=base.id, dataset_id=dataset.id, method="lora",
                  hyperparameters=STEPS)
        s.add(job)
        s.commit()
        return job.id


def _job(rt, job_id) -> Job:
    with rt.sessions() as s:
        return s.get(Job, job_id)


def _count(rt, model, **where) -> int:
    with rt.sessions() as s:
        stmt = select(func.count()).select_from(model)
        for column, value in where.items():
            stmt = stmt.where(getattr(model, column) == value)
        return s.scalar(stmt)


def _stored(rt, suffix: str) -> list[Path]:
    return sorted(rt.settings.artifacts_dir.rglob(f"*{suffix}"))


def test_training_refuses_a_dataset_nobody_accepted(rt, job_id):
    """A job whose dataset is not accepted (one queued before flagged datasets had to wait for a reviewer)
    trains nothing: the stage refuses it before loading a model, and its failure link fails the job."""
    with rt.sessions() as s:
        s.execute(update(Dataset).where(Dataset.id == s.get(Job, job_id).dataset_id).values(status="flagged"))
        s.commit()
    with pytest.raises(train.DatasetNotAccepted, match="is flagged; only an accepted dataset is trained"):
        train.train(rt, job_id, "w1/a")
    assert _count(rt, Artifact) == 0 and _stored(rt, ".safetensors") == []
    assert verdict.fail(rt, job_id, "w1/a", "DatasetNotAccepted") and _job(rt, job_id).status == "failed"


def test_stages_run_once_each_and_give_one_verdict(rt, job_id):
    assert train.train(rt, job_id, "w1/a") is True
    job = _job(rt, job_id)
    assert (job.status, job.worker, job.lease_expires_at, job.attempts) == ("auditing", None, None, 1)
    assert train.train(rt, job_id, "w2/b") is False  # a redelivered train message changes nothing
    assert _count(rt, Artifact) == 1 and len(_stored(rt, ".safetensors")) == 1

    assert audit.audit(rt, job_id, "w1/c") is True
    assert _job(rt, job_id).stage == "deciding"
    first = _count(rt, Audit)
    with rt.sessions() as s:  # the audit lease is held until the verdict; a second audit must wait
        assert s.get(Job, job_id).worker == "w1/c"
    assert audit.audit(rt, job_id, "w2/d") is False
    assert _count(rt, Audit) == first == 1
    with rt.sessions() as s:  # the profile names no US classifier: the default one scored the same images
        report = json.loads(rt.store.path("acme", s.scalars(select(Audit.report_path)).one()).read_text())
    assert report["us_classifier"]["name"] == "opennsfw" and report["metrics"]["us_rate"]["n"] == 3
    assert report["render"]["settings"]["dtype"] == "float32"
    assert report["sequential"]["plan"]["rounds"] == 4  # the profile's default: a sequential audit
    assert [e["scale"] for e in report["lora_scales"]] == [1.0, 2.0]  # the LoRA at 1 and at max_lora_scale
    assert report["adapter"]["scale"] in (1.0, 2.0)
    assert list(report["families"])[:2] == ["profile", "captions"]  # the job's own captions, paired with the base
    assert report["job_probes"]["trigger_candidates"] == []  # "a blue square" holds no rare word
    assert {s["family"] for s in report["samples"]} == set(report["families"])
    # The deadline scales with what the audit could render: the 3 probes, the captions and the (upper bound on)
    # triggers families at both scales, and the base model's renders of those families.
    family = zero_hit_images(rt.settings.verdict_policy)
    images = 2 * (3 + family + 3) + (family + 3)
    assert report["deadline"] == {"images": images, "computed_seconds": 1800 + 10.0 * images,
                                  "seconds": 1800 + 10.0 * images, "ceiling_seconds": 5 * 3600, "clamped": False}
    assert sum(e["images"] for e in report["lora_scales"]) <= images
    with rt.sessions() as s:
        key = s.scalars(select(BaseModel.baseline_report_path)).one()  # the current profile's, in the store
        baseline = json.loads(rt.store.path(PLATFORM_TENANT, key).read_text())
    assert "sequential" not in baseline and len(baseline["samples"]) == 3  # baselines render every image

    state = verdict.decide(rt, job_id)
    assert state in ("released", "review", "withheld")
    assert verdict.decide(rt, job_id) is None
    assert _count(rt, Verdict, job_id=job_id) == 1
    job = _job(rt, job_id)
    assert job.status == state and job.finished_at is not None and job.worker is None
    with rt.sessions() as s:
        actions = [(e.from_state, e.to_state) for e in s.scalars(
            select(AuditLogEntry).where(AuditLogEntry.entity_id == job_id, AuditLogEntry.action == "status"))]
    assert actions == [("queued", "training"), ("training", "auditing"), ("auditing", state)]
    baseline = rt.settings.baselines_dir
    assert len(list(baseline.rglob("report.json"))) == 1  # the base model's figures, audited once (cached here)


def _expire(rt, job_id) -> None:
    with rt.sessions() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()


def test_a_worker_presumed_dead_commits_nothing(rt, job_id, monkeypatch):
    """Worker w1 claims the job, stalls past its lease; the reaper requeues it; w2 trains it. When w1 wakes
    and finishes, its checkpoint is refused (LeaseLost) and its file removed: one artifact, one attempt's."""
    import gate.training

    real = gate.training.train_job
    requeued = []

    def stalled_train(*args, **kwargs):
        result = real(*args, **kwargs)
        monkeypatch.setattr(gate.training, "train_job", real)  # w2 trains normally
        _expire(rt, job_id)  # w1's heartbeat "missed": the lease ran out while it trained
        assert reap(rt.sessions, lambda *a: requeued.append(a), rt.settings.max_attempts) == 1
        assert train.train(rt, job_id, "w2/b") is True  # the job went to w2, which finished first
        return result

    monkeypatch.setattr(gate.training, "train_job", stalled_train)
    with pytest.raises(LeaseLost):
        train.train(rt, job_id, "w1/a")
    assert requeued == [("job", job_id, "train")]
    job = _job(rt, job_id)
    assert (job.status, job.attempts) == ("auditing", 2)
    with rt.sessions() as s:
        artifact = s.scalars(select(Artifact)).one()
    assert [p.name for p in _stored(rt, ".safetensors")] == [Path(artifact.path).name]


def test_expired_audit_lease_is_reaped_and_the_audit_redone(rt, job_id):
    train.train(rt, job_id, "w1/a")
    with rt.sessions() as s:
        assert claim(s, s.get(Job, job_id), "w1/dead", 30)  # a worker took the audit, then died
        s.commit()
    assert audit.audit(rt, job_id, "w2/b") is False  # its lease is still live
    _expire(rt, job_id)
    requeued = []
    assert reap(rt.sessions, lambda *a: requeued.append(a), rt.settings.max_attempts) == 1
    assert requeued == [("job", job_id, "audit")] and _job(rt, job_id).worker is None
    assert audit.audit(rt, job_id, "w2/b") is True
    assert verdict.decide(rt, job_id) is not None


def test_a_checkpoint_that_fails_its_hash_is_blocked_as_incomplete(rt, job_id):
    train.train(rt, job_id, "w1/a")
    with rt.sessions() as s:
        artifact = s.scalars(select(Artifact)).one()
    rt.store.path("acme", artifact.path).write_bytes(b"tampered")
    assert audit.audit(rt, job_id, "w1/b") is True
    assert verdict.decide(rt, job_id) == "withheld"
    with rt.sessions() as s:
        row = s.scalars(select(Verdict)).one()
    assert row.decision == "block" and row.reasons[0].startswith("audit incomplete")
    assert "sha256" in row.reasons[0]


def test_a_detector_that_raises_blocks_the_job(rt, job_id, monkeypatch):
    from auditing.detectors.shapes import ShapesConceptDetector

    train.train(rt, job_id, "w1/a")
    audit.ensure_baseline(rt, _job(rt, job_id).base_model_id)  # the base model's figures exist

    def broken(self, images):
        raise RuntimeError("detector crashed")

    monkeypatch.setattr(ShapesConceptDetector, "detect", broken)
    audit.audit(rt, job_id, "w1/b")
    assert verdict.decide(rt, job_id) == "withheld"
    with rt.sessions() as s:
        assert "detector crashed" in s.scalars(select(Verdict)).one().reasons[0]


def test_failure_link_fails_only_the_attempt_that_holds_the_job(rt, job_id):
    with rt.sessions() as s:
        assert claim(s, s.get(Job, job_id), "w2/b", 30, to_state="training")
        s.commit()
    assert verdict.fail(rt, job_id, "w1/a", "RuntimeError: stale") is False  # not w1's any more
    assert _job(rt, job_id).status == "training"
    assert verdict.fail(rt, job_id, "w2/b", "RuntimeError: out of memory") is True
    job = _job(rt, job_id)
    assert (job.status, job.error) == ("failed", "RuntimeError: out of memory")
    assert verdict.decide(rt, job_id) is None and _count(rt, Verdict) == 0  # failed: no verdict, nothing released


def test_a_dreambooth_job_is_audited_with_its_unet(rt, job_id):
    """A DreamBooth checkpoint is a whole UNet: stored as kind "unet", applied to the base pipeline by the
    auditor, and judged like any other (not "audit incomplete")."""
    with rt.sessions() as s:
        job = s.get(Job, job_id)
        job.method, job.hyperparameters = "dreambooth", {"instance_prompt": "a sks square", "steps": 2}
        s.commit()
    assert train.train(rt, job_id, "w1/a") and audit.audit(rt, job_id, "w1/b")
    assert verdict.decide(rt, job_id) in ("released", "review", "withheld")
    with rt.sessions() as s:
        assert s.scalars(select(Artifact)).one().kind == "unet"
        reasons = s.scalars(select(Verdict)).one().reasons
    assert not any(r.startswith("audit incomplete") for r in reasons), reasons
