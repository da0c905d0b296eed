"""Base models' baselines through the artifact store: several worker hosts (each its own state directory, one
database and one store) audit a baseline once between them, never trust a stored copy that changed, keep one
row when they race, and audit a changed profile anew."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select, update

from auditing.models.hashing import weights_sha256
from auditing.shapes.cli import PRETRAINED_WORLD
from gate.pipeline import audit
from gate.pipeline.runtime import Runtime
from gate.settings import Settings
from gate.storage.db import upgrade
from gate.storage.models import PLATFORM_TENANT, Baseline, BaseModel
from gate.storage.sweep import sweep

PROBES = "prompt\na red triangle\na blue circle\n"


@pytest.fixture
def host(tmp_path):
    """``host(name)``: a worker host's runtime, with its own state directory (caches) and the shared database
    and store."""
    database = f"sqlite:///{tmp_path / 'ftgate.db'}"
    upgrade(database)
    opened = []

    def open_host(name: str) -> Runtime:
        state = tmp_path / name
        opened.append(Runtime.open(Settings(state_dir=state, database_url=database, broker_url=None,
                                            artifacts_dir=tmp_path / "bucket", lease_seconds=30)))
        return opened[-1]

    yield open_host
    for rt in opened:
        rt.engine.dispose()


def register_world(rt: Runtime, folder) -> str:
    """The shapes world as a base model with a two-probe profile (its probes written in ``folder``); its id."""
    probes = folder / "probes.csv"
    probes.write_text(PROBES)
    profile = {"probes": str(probes), "detector": "shapes", "detector_options": {"concept": "red triangle"},
               "inference_steps": 2, "guidance_scale": 5.0, "batch_size": 8}
    with rt.sessions() as s:
        base = BaseModel(name="world", path=str(PRETRAINED_WORLD), weights_sha256=weights_sha256(PRETRAINED_WORLD),
                         audit_profile=profile)
        s.add(base)
        s.commit()
        return base.id


@pytest.fixture
def base_id(host, tmp_path) -> str:
    return register_world(host("registry"), tmp_path)


@pytest.fixture
def renders(monkeypatch) -> list[str]:
    """The state directory of each host that audited a baseline, once per audit."""
    audited, original = [], audit.audit_base

    def counted(rt, *args, **kwargs):
        audited.append(rt.settings.state_dir.name)
        return original(rt, *args, **kwargs)

    monkeypatch.setattr(audit, "audit_base", counted)
    return audited


def _rows(rt) -> list[Baseline]:
    with rt.sessions() as s:
        return list(s.scalars(select(Baseline).order_by(Baseline.created_at)))


def test_a_second_host_reuses_the_first_hosts_baseline_without_rendering(host, base_id, renders):
    a, b = host("a"), host("b")
    first = audit.ensure_baseline(a, base_id)
    assert renders == ["a"] and len(first["samples"]) == 2
    second = audit.ensure_baseline(b, base_id)
    assert renders == ["a"] and second == first  # fetched from the store, verified, not audited again
    assert json.loads((b.settings.baselines_dir / base_id).glob("*/report.json").__next__().read_text()) == first
    assert audit.ensure_baseline(b, base_id) == first and renders == ["a"]  # b's cache now
    [row] = _rows(a)
    with a.sessions() as s:
        base = s.get(BaseModel, base_id)
    assert (base.baseline_report_path, base.baseline_report_sha256) == (row.report_key, row.report_sha256)
    assert a.store.verify(PLATFORM_TENANT, row.report_key) and a.store.verify(PLATFORM_TENANT, row.html_key)


def test_a_changed_stored_baseline_is_audited_again_not_trusted(host, base_id, renders):
    a, b = host("a"), host("b")
    audit.ensure_baseline(a, base_id)
    [row] = _rows(a)
    a.store.path(PLATFORM_TENANT, row.report_key).write_text(json.dumps({"samples": [], "metrics": {}}))
    again = audit.ensure_baseline(b, base_id)  # b has no cached copy: the store's no longer hashes to its key
    assert renders == ["a", "b"] and len(again["samples"]) == 2
    [replaced] = _rows(b)
    assert replaced.id == row.id  # the row is replaced, and names a file that verifies (the changed one was
    assert b.store.verify(PLATFORM_TENANT, replaced.report_key)  # removed: the same bytes may have the same key)
    assert audit.ensure_baseline(a, base_id) == again and renders == ["a", "b"]  # a's cache is stale: fetched


def test_a_recorded_hash_that_the_stored_report_does_not_match_is_audited_again(host, base_id, renders):
    a = host("a")
    audit.ensure_baseline(a, base_id)
    with a.sessions() as s:
        s.execute(update(Baseline).values(report_sha256="0" * 64))
        s.commit()
    audit.ensure_baseline(host("b"), base_id)
    assert renders == ["a", "b"] and _rows(a)[0].report_sha256 != "0" * 64


def test_two_hosts_racing_keep_one_row_and_the_later_uses_the_first(host, base_id, renders, monkeypatch):
    a, b = host("a"), host("b")
    counted = audit.audit_base

    def a_finishes_first(rt, *args, **kwargs):
        if rt is b and "a" not in renders:  # while b renders, a audits and records its baseline
            audit.ensure_baseline(a, base_id)
        return counted(rt, *args, **kwargs)

    monkeypatch.setattr(audit, "audit_base", a_finishes_first)
    from_b = audit.ensure_baseline(b, base_id)
    assert renders == ["a", "b"]
    [row] = _rows(a)
    assert from_b == audit.ensure_baseline(a, base_id) and row.report_sha256 == audit.report_sha256(from_b)
    with a.sessions() as s:
        assert s.get(BaseModel, base_id).baseline_report_path == row.report_key
    b_cached = next((b.settings.baselines_dir / base_id).glob("*/report.json"))
    assert audit.report_sha256(json.loads(b_cached.read_text())) == row.report_sha256  # b's cache holds a's
    # b's own report is named by no row: the sweep removes it once past its grace period, a's stays.
    sweep(a.store, a.sessions, grace_s=-60)
    assert {key for key, _ in a.store.stored_files()} == {row.report_key, row.html_key}
    assert a.store.verify(PLATFORM_TENANT, row.report_key) and a.store.verify(PLATFORM_TENANT, row.html_key)


def test_another_profile_gets_its_own_baseline(host, base_id, renders):
    a = host("a")
    audit.ensure_baseline(a, base_id)
    with a.sessions() as s:
        base = s.get(BaseModel, base_id)
        base.audit_profile = {**base.audit_profile, "inference_steps": 3}
        s.commit()
    audit.ensure_baseline(a, base_id)
    assert renders == ["a", "a"]
    rows = _rows(a)
    assert len(rows) == 2 and rows[0].profile_sha256 != rows[1].profile_sha256
    with a.sessions() as s:
        assert s.get(BaseModel, base_id).baseline_report_path == rows[1].report_key
        assert s.scalar(select(func.count()).select_from(Baseline)) == 2


def test_a_baseline_from_before_the_store_is_moved_there_not_audited_again(host, base_id, renders):
    """Before migration 0013 a baseline lived in a host's folder, the base model naming its path and hash: that
    host records it in the store without rendering; one whose hash is not the recorded one is audited."""
    a = host("a")
    first = audit.ensure_baseline(a, base_id)
    [cached] = (a.settings.baselines_dir / base_id).glob("*/report.json")
    with a.sessions() as s:  # as an upgraded database looks: no baselines row, the base model names the file
        s.execute(Baseline.__table__.delete())
        s.execute(update(BaseModel).values(baseline_report_path=str(cached),
                                           baseline_report_sha256=audit.report_sha256(first)))
        s.commit()
    assert audit.ensure_baseline(a, base_id) == first and renders == ["a"]
    [row] = _rows(a)
    assert row.report_sha256 == audit.report_sha256(first) and a.store.verify(PLATFORM_TENANT, row.html_key)
    assert audit.ensure_baseline(host("b"), base_id) == first and renders == ["a"]  # and shared from there
    with a.sessions() as s:
        s.execute(Baseline.__table__.delete())
        s.execute(update(BaseModel).values(baseline_report_path=str(cached), baseline_report_sha256="0" * 64))
        s.commit()
    audit.ensure_baseline(a, base_id)
    assert renders == ["a", "a"]
