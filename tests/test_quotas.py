"""Per-tenant quotas (``gate.service.quotas``): unfinished jobs, datasets and their bytes, and the budget of
withheld jobs, each refused at creation with the API's error shape naming the limit; other tenants unaffected."""

from __future__ import annotations

from datetime import timedelta

import pytest
from test_api import UPLOAD_LIMIT, Env, good_zip
from test_api_results import dataset_of, move

from gate.service import quotas
from gate.settings import Limits
from gate.storage.models import Dataset, Job, utcnow


def env_with(tmp_path, migrated, **quota) -> Env:
    return Env(tmp_path, migrated, Limits(max_upload_bytes=UPLOAD_LIMIT, **quota))


def error(response) -> dict:
    return response.json["error"]


def test_unfinished_jobs_are_capped_per_tenant(tmp_path, migrated):
    """The third job while two are queued or running is a 429 naming max_active_jobs; a retried POST still gets
    its job; a finished job frees a place; another tenant has its own."""
    env = env_with(tmp_path, migrated, max_active_jobs=2)
    first = env.job(dataset_of(env), idempotency_key="k1")
    second = env.job(dataset_of(env))
    assert (first.status_code, second.status_code) == (201, 201)
    move(env, second.json["id"], "training")
    refused = env.job(dataset_of(env))
    assert refused.status_code == 429
    assert {k: error(refused)[k] for k in ("reason", "field", "limit", "maximum", "current")} == \
        {"reason": "quota_exceeded", "field": "tenant", "limit": "max_active_jobs", "maximum": 2, "current": 2}
    assert "max_active_jobs=2" in error(refused)["message"]
    assert env.count(Job) == 2 and len(env.enqueued) == 2
    assert env.job(dataset_of(env), idempotency_key="k1").status_code == 200  # the existing job, not a new one
    assert env.job(dataset_of(env, "b"), who="b").status_code == 201
    move(env, first.json["id"], "released")
    assert env.job(dataset_of(env)).status_code == 201


def test_withheld_jobs_spend_the_tenants_budget(tmp_path, migrated, monkeypatch):
    """After max_withheld_jobs withheld jobs within the window new jobs are a 403 naming the budget; released
    jobs do not count, other tenants are not affected, and the refusal ends once the window has passed."""
    env = env_with(tmp_path, migrated, max_withheld_jobs=2, withheld_window_hours=24)
    for state in ("withheld", "released", "withheld"):
        r = env.job(dataset_of(env))
        move(env, r.json["id"], state)
    refused = env.job(dataset_of(env))
    assert refused.status_code == 403
    assert {k: error(refused)[k] for k in ("reason", "field", "limit", "maximum", "current")} == \
        {"reason": "withheld_budget_exhausted", "field": "tenant", "limit": "max_withheld_jobs", "maximum": 2,
         "current": 2}
    assert "withheld_window_hours" in error(refused)["message"] and env.count(Job) == 3
    assert env.job(dataset_of(env, "b"), who="b").status_code == 201
    monkeypatch.setattr(quotas, "utcnow", lambda: utcnow() + timedelta(hours=25))
    assert env.job(dataset_of(env)).status_code == 201


@pytest.mark.parametrize("limit", ["max_datasets", "max_stored_bytes"])
def test_datasets_and_their_bytes_are_capped_per_tenant(tmp_path, migrated, limit):
    """An upload over the tenant's dataset count or stored bytes is a 429 naming ``file`` and the limit, refused
    before the intake: no row, no folder, nothing stored."""
    data = good_zip()
    maximum = 1 if limit == "max_datasets" else len(data) + 10
    env = env_with(tmp_path, migrated, **{limit: maximum})
    assert env.upload(data).status_code == 202
    files, stored = env.dataset_files(), set(env.settings.artifacts_dir.rglob("*"))
    refused = env.upload(good_zip(4))
    assert refused.status_code == 429
    assert {k: error(refused)[k] for k in ("reason", "field", "limit", "maximum")} == \
        {"reason": "quota_exceeded", "field": "file", "limit": limit, "maximum": maximum}
    assert error(refused)["current"] == (1 if limit == "max_datasets" else len(data))
    assert env.count(Dataset) == 1 and env.dataset_files() == files
    assert set(env.settings.artifacts_dir.rglob("*")) == stored
    assert env.upload(data, who="b").status_code == 202


@pytest.mark.parametrize("status, counted", [("failed", False), ("rejected", True)])
def test_failed_datasets_do_not_count_rejected_ones_do(tmp_path, migrated, status, counted):
    """A dataset the service failed to take in frees its place (the customer is told to upload it again); a
    rejected one keeps it, so uploads refused again and again stay bounded by max_datasets."""
    env = env_with(tmp_path, migrated, max_datasets=1)
    first = env.upload(good_zip())
    assert first.status_code == 202
    with env.sessions() as s:
        s.get(Dataset, first.json["id"]).status = status
        s.commit()
    again = env.upload(good_zip(4))
    if counted:
        assert again.status_code == 429
        assert {k: error(again)[k] for k in ("field", "limit", "maximum", "current")} == \
            {"field": "file", "limit": "max_datasets", "maximum": 1, "current": 1}
    else:
        assert again.status_code == 202, again.json
        assert env.upload(good_zip(5)).status_code == 429  # the new one counts
