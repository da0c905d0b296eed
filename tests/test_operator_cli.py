"""The operator's commands at the gate's host (``gate.operator_cli``): ``ftgate base-models`` registers, lists
and shows base models with the API's own checks (``gate.service.base_models``), refusals one line naming the
field with exit 2; ``ftgate reviews list`` shows what waits for a reviewer."""

from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import select
from test_api import Env, good_zip, registrable_model
from test_api_results import make_job

from gate.cli import main
from gate.storage.db import make_engine, session_factory
from gate.storage.models import AuditLogEntry, BaseModel


@pytest.fixture
def gate_env(tmp_path, migrated, monkeypatch):
    database = tmp_path / "ftgate.db"
    shutil.copy(migrated, database)
    monkeypatch.setenv("FTGATE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("FTGATE_DATABASE_URL", f"sqlite:///{database}")
    monkeypatch.setenv("FTGATE_BROKER_URL", "redis://127.0.0.1:1/0")  # no broker: the baseline is not queued
    model, probes = registrable_model(tmp_path)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"probes": str(probes), "detector": "shapes"}))
    return tmp_path, model, profile, session_factory(make_engine(f"sqlite:///{database}"))


def test_register_list_and_show_with_the_apis_checks(gate_env, capsys):
    tmp_path, model, profile, sessions = gate_env
    assert main(["base-models", "register", "--name", "sd-hardened", "--path", str(model), "--profile", str(profile),
                 "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "sd-hardened" and shown["path"] == str(model) and len(shown["weights_sha256"]) == 64
    with sessions() as s:
        row = s.scalars(select(BaseModel)).one()
        actions = [e.action for e in s.scalars(select(AuditLogEntry).where(AuditLogEntry.entity_id == row.id))]
    assert (row.id, row.audit_profile["detector"]) == (shown["id"], "shapes")
    assert actions == ["created", "baseline not queued"]  # the broker is away: the first audit makes the baseline

    assert main(["base-models", "list", "--json"]) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [row.id]
    assert main(["base-models", "show", row.id]) == 0
    assert "sd-hardened" in capsys.readouterr().out


def test_refusals_name_the_field_and_exit_2(gate_env, capsys):
    tmp_path, model, profile, sessions = gate_env
    register = ["base-models", "register", "--path", str(model), "--profile", str(profile)]
    assert main([*register, "--name", "one"]) == 0
    capsys.readouterr()
    assert main([*register, "--name", "one"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "ftgate: error: a base model named 'one' exists (field name)"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"probes": str(tmp_path / "probes.csv"), "detector": "nope"}))
    assert main(["base-models", "register", "--name", "two", "--path", str(model), "--profile", str(bad)]) == 2
    assert "(field audit_profile.detector)" in capsys.readouterr().err
    assert main(["base-models", "register", "--name", "three", "--path", str(tmp_path / "nope"),
                 "--profile", str(profile)]) == 2
    assert "(field path)" in capsys.readouterr().err
    assert main(["base-models", "show", "0" * 32]) == 2
    assert "no base model" in capsys.readouterr().err
    with sessions() as s:
        assert [r.name for r in s.scalars(select(BaseModel))] == ["one"]


def test_reviews_list_shows_flagged_jobs_and_datasets_oldest_first(tmp_path, migrated, monkeypatch, capsys):
    env = Env(tmp_path, migrated)
    waiting = [make_job(env, "review"), make_job(env, "review", who="b")]
    make_job(env, "released")
    flagged = env.upload(good_zip(n=20, red=1)).json["id"]
    monkeypatch.setenv("FTGATE_STATE_DIR", str(env.state))
    monkeypatch.setenv("FTGATE_DATABASE_URL", env.settings.database_url)
    assert main(["reviews", "list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["kind"], r["id"]) for r in rows] == [("job", waiting[0]), ("job", waiting[1]), ("dataset", flagged)]
    assert main(["reviews", "list"]) == 0
    out = capsys.readouterr()
    assert "2 job(s) and 1 dataset(s) wait for a reviewer" in out.err and len(out.out.splitlines()) == 3
