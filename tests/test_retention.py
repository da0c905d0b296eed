"""The retention sweep (``gate.pipeline.retention``): job scratch, training state, the render cache and the pairs'
renders kept in the store go by file age, a running job's folder never does, expired reviewer-page sessions are
deleted, and so are settled webhook deliveries past their retention, never a pending one."""

from __future__ import annotations

import io
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from gate.pipeline import retention
from gate.pipeline.retention import Removed
from gate.pipeline.train import TRAINING_STATE
from gate.settings import Settings, SettingsError, load_settings
from gate.storage.artifacts import PAIR_IMAGE_SUFFIX, ArtifactStore
from gate.storage.models import (
    BaseModel,
    Dataset,
    Job,
    Tenant,
    WebhookDelivery,
    WebhookOutbox,
    WebSession,
    utcnow,
)

HOUR = 3600.0


def _settings(tmp_path: Path, **retention) -> Settings:
    return Settings(state_dir=tmp_path, database_url="sqlite:///unused.db", broker_url=None,
                    artifacts_dir=tmp_path / "artifacts", **retention)


def sweep_retention(settings: Settings, sessions) -> Removed:
    """The sweep with the settings' folder store."""
    return retention.sweep_retention(settings, sessions, ArtifactStore(settings.artifacts_dir))


def _jobs(sessions, **statuses: str) -> dict[str, str]:
    """One job per ``name=status``; their ids by name."""
    with sessions() as session:
        session.add(Tenant(id="acme", name="acme"))
        model = BaseModel(name="hardened", path="/m", weights_sha256="a" * 64)
        dataset = Dataset(tenant_id="acme", name="cats", content_sha256="b" * 64, artifact_path="k", size_bytes=1,
                          status="accepted")
        jobs = {name: Job(tenant_id="acme", base_model=model, dataset=dataset, method="lora", status=status)
                for name, status in statuses.items()}
        session.add_all(jobs.values())
        session.commit()
        return {name: job.id for name, job in jobs.items()}


def _file(path: Path, age_hours: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    then = time.time() - age_hours * HOUR
    os.utime(path, (then, then))
    return path


def test_old_files_of_jobs_that_no_longer_run_go_and_a_running_jobs_stay(sessions, tmp_path):
    """Defaults: render cache 24 h, scratch 72 h, a failed job's training state 7 days. A released job's old
    intermediate checkpoint and audit files go, its fresh file stays; a failed job keeps its state until the
    state's own age; a training job keeps everything however old; a folder no job names goes by age."""
    settings = _settings(tmp_path)
    ids = _jobs(sessions, released="released", failed="failed", training="training")
    jobs = settings.jobs_dir
    old_checkpoint = _file(jobs / ids["released"] / "attempt-1" / "train" / "checkpoints" / "step-10" / "w.safetensors",
                           73)
    old_report = _file(jobs / ids["released"] / "audit-w1" / "report.json", 100)
    fresh = _file(jobs / ids["released"] / "attempt-2" / "train" / "w.safetensors", 71)
    failed_scratch = _file(jobs / ids["failed"] / "attempt-1" / "train" / "w.safetensors", 80)
    recent_state = _file(jobs / ids["failed"] / TRAINING_STATE / "state.pt", 100)
    old_state = _file(jobs / ids["failed"] / TRAINING_STATE / "rng.pt", 24 * 7 + 1)
    running = [_file(jobs / ids["training"] / "attempt-1" / "train" / "w.safetensors", 1000),
               _file(jobs / ids["training"] / TRAINING_STATE / "state.pt", 1000)]
    orphan = _file(jobs / ("0" * 32) / "attempt-1" / "w.safetensors", 73)
    old_render, new_render = (_file(settings.render_cache_dir / "ab" / f"{name}.png", age)
                              for name, age in (("old", 25), ("new", 23)))

    removed = sweep_retention(settings, sessions)

    assert removed == Removed(scratch_files=4, training_state_files=1, render_cache_files=1, sessions=0)
    gone = (old_checkpoint, old_report, failed_scratch, old_state, orphan, old_render)
    assert not any(path.exists() for path in gone)
    assert all(path.is_file() for path in (fresh, recent_state, *running, new_render))
    assert not (jobs / ids["released"] / "audit-w1").exists() and not (jobs / ("0" * 32)).exists()  # emptied: gone
    assert sweep_retention(settings, sessions) == Removed(0, 0, 0, 0)


def test_ages_come_from_the_settings(sessions, tmp_path):
    settings = _settings(tmp_path, render_cache_retention_hours=1, scratch_retention_hours=2,
                         training_state_retention_hours=3)
    (job,) = _jobs(sessions, done="withheld").values()
    kept = [_file(settings.jobs_dir / job / "attempt-1" / "w.safetensors", 1.5),
            _file(settings.jobs_dir / job / TRAINING_STATE / "state.pt", 2.5),
            _file(settings.render_cache_dir / "ab" / "x.png", 0.5)]
    _file(settings.jobs_dir / job / "attempt-1" / "old.safetensors", 2.5)
    _file(settings.jobs_dir / job / TRAINING_STATE / "old.pt", 3.5)
    _file(settings.render_cache_dir / "cd" / "y.png", 1.5)
    assert sweep_retention(settings, sessions) == Removed(1, 1, 1, 0)
    assert all(path.is_file() for path in kept)


def test_expired_sessions_are_deleted(sessions, tmp_path):
    with sessions() as session:
        session.add_all([WebSession(id="e" * 64, csrf_token="t", expires_at=utcnow() - timedelta(seconds=1)),
                         WebSession(id="l" * 64, csrf_token="t", expires_at=utcnow() + timedelta(hours=1))])
        session.commit()
    assert sweep_retention(_settings(tmp_path), sessions).sessions == 1
    with sessions() as session:
        assert [row.id for row in session.query(WebSession)] == ["l" * 64]


def test_retention_settings_are_checked(tmp_path):
    env = {"HOME": str(tmp_path), "FTGATE_SCRATCH_RETENTION_HOURS": "48", "FTGATE_RENDER_CACHE_RETENTION_HOURS": "6",
           "FTGATE_TRAINING_STATE_RETENTION_HOURS": "240"}
    settings = load_settings(env=env)
    assert (settings.render_cache_retention_hours, settings.scratch_retention_hours,
            settings.training_state_retention_hours) == (6, 48, 240)
    with pytest.raises(SettingsError, match=r"render_cache_retention_hours \(24\) must not exceed "
                                            r"scratch_retention_hours \(12\)") as caught:
        load_settings(env={"HOME": str(tmp_path), "FTGATE_SCRATCH_RETENTION_HOURS": "12"})
    assert caught.value.field == "render_cache_retention_hours"
    with pytest.raises(SettingsError, match=r"scratch_retention_hours must be greater than or equal to 1 \(got 0\)"):
        load_settings(env={"HOME": str(tmp_path), "FTGATE_SCRATCH_RETENTION_HOURS": "0"})
    with pytest.raises(SettingsError, match=r"webhook_retention_hours must be less than or equal to 8760 \(got 9000\) "
                                            r"\[set by FTGATE_WEBHOOK_RETENTION_HOURS\]"):
        load_settings(env={"HOME": str(tmp_path), "FTGATE_WEBHOOK_RETENTION_HOURS": "9000"})


def test_the_pairs_renders_in_the_store_go_with_the_render_cache(sessions, tmp_path):
    """The unredacted renders an audit put in the store for reviewers go after render_cache_retention_hours,
    by their time in the store; the store's other files are not the retention sweep's."""
    settings = _settings(tmp_path, render_cache_retention_hours=2)
    store = ArtifactStore(settings.artifacts_dir)
    old, recent = (store.put("acme", io.BytesIO(data), suffix=PAIR_IMAGE_SUFFIX) for data in (b"old", b"recent"))
    checkpoint = store.put("acme", io.BytesIO(b"weights"), suffix=".safetensors")
    for stored in (old, checkpoint):
        then = time.time() - 3 * HOUR
        os.utime(settings.artifacts_dir / stored.key, (then, then))
    assert retention.sweep_retention(settings, sessions, store).pair_images == 1
    kinds = ((old, PAIR_IMAGE_SUFFIX), (recent, PAIR_IMAGE_SUFFIX), (checkpoint, ".safetensors"))
    assert [store.exists("acme", s.sha256, suffix) for s, suffix in kinds] == [False, True, True]


def test_settled_webhook_deliveries_go_after_their_retention_pending_ones_never(sessions, tmp_path):
    """Outbox rows delivered or abandoned more than webhook_retention_hours ago go with their delivery log; a
    recent settled one stays, and a pending one stays however old (it is still owed)."""
    settings = _settings(tmp_path, webhook_retention_hours=48)
    (job,) = _jobs(sessions, done="released").values()
    ages = {1: ("delivered", 49), 2: ("abandoned", 100), 3: ("delivered", 47), 4: ("pending", 1000)}
    with sessions() as session:
        for seq, (state, age) in ages.items():
            owed = utcnow() - timedelta(hours=age)
            session.add(WebhookOutbox(tenant_id="acme", job_id=job, event_seq=seq, state=state, attempts=2,
                                      created_at=owed, next_attempt_at=owed))
            session.add_all([WebhookDelivery(tenant_id="acme", job_id=job, event_seq=seq, url="https://example.net/h",
                                             attempt=attempt, status_code=500, at=owed) for attempt in (1, 2)])
        session.commit()
    removed = sweep_retention(settings, sessions)
    assert (removed.webhooks, removed.webhook_deliveries) == (2, 4)
    with sessions() as session:
        assert sorted(row.event_seq for row in session.query(WebhookOutbox)) == [3, 4]
        assert sorted({row.event_seq for row in session.query(WebhookDelivery)}) == [3, 4]
        assert session.query(WebhookDelivery).count() == 4
    assert sweep_retention(settings, sessions) == Removed(0, 0, 0, 0)


def test_the_reapers_sweep_lists_the_store_once_for_both_sweeps(sessions, tmp_path):
    """A bucket listing is paid per request: one reaper sweep lists the store once, and with that one listing the
    store's sweep removes an old file no row names and the retention sweep an old pair render."""
    from gate.pipeline.runtime import Runtime
    from gate.worker.reaper import sweep_store

    settings = _settings(tmp_path, render_cache_retention_hours=2)

    class CountingStore(ArtifactStore):
        listings = 0

        def stored_files(self):
            CountingStore.listings += 1
            return super().stored_files()

    store = CountingStore(settings.artifacts_dir)
    pair = store.put("acme", io.BytesIO(b"pair"), suffix=PAIR_IMAGE_SUFFIX)
    orphan = store.put("acme", io.BytesIO(b"orphan"), suffix=".safetensors")
    for stored in (pair, orphan):
        then = time.time() - 3 * HOUR
        os.utime(settings.artifacts_dir / stored.key, (then, then))
    sweep_store(Runtime(settings, None, sessions, store))
    assert CountingStore.listings == 1
    assert not store.exists("acme", pair.sha256, PAIR_IMAGE_SUFFIX)
    assert not store.exists("acme", orphan.sha256, ".safetensors")
