"""``Idempotency-Key`` on ``POST /v1/jobs`` (and the body's ``idempotency_key``): the same key with the same
parameters returns the first job and dispatches nothing; with other parameters it is a 409."""

from __future__ import annotations

import pytest
from test_api import Env, good_zip

from gate.storage.models import Job


@pytest.fixture
def env(tmp_path, migrated) -> Env:
    return Env(tmp_path, migrated)


def _post(env: Env, body: dict, key: str | None = None, who: str = "a"):
    headers = env.headers(who) | ({"Idempotency-Key": key} if key is not None else {})
    return env.client.post("/v1/jobs", headers=headers, json=body)


def _body(env: Env, dataset: str, **hyperparameters) -> dict:
    return {"base_model": env.base_model_id, "dataset": dataset, "method": "lora",
            "hyperparameters": {"steps": 100, "rank": 4, "learning_rate": 1e-4, **hyperparameters}}


def test_a_replayed_header_returns_the_first_job_and_dispatches_once(env):
    body = _body(env, env.upload(good_zip()).json["id"])
    first = _post(env, body, "retry-1")
    assert first.status_code == 201 and first.json["idempotency_key"] == "retry-1"
    reordered = {**dict(reversed(list(body.items()))), "hyperparameters": dict(reversed(body["hyperparameters"]
                                                                                       .items()))}
    again = _post(env, reordered, "retry-1")  # the same parameters, whatever the order of their keys
    assert again.status_code == 200 and again.json["id"] == first.json["id"]
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert env.enqueued == [first.json["id"]] and env.count(Job) == 1
    other_tenant = _post(env, _body(env, env.upload(good_zip(), who="b").json["id"]), "retry-1", who="b")
    assert other_tenant.status_code == 201  # keys are per tenant


def test_the_same_key_with_other_parameters_is_a_409_naming_the_header(env):
    body = _body(env, env.upload(good_zip()).json["id"])
    assert _post(env, body, "retry-2").status_code == 201
    r = _post(env, _body(env, body["dataset"], steps=200), "retry-2")
    assert r.status_code == 409
    assert (r.json["error"]["reason"], r.json["error"]["field"]) == ("idempotency_conflict", "Idempotency-Key")
    assert env.count(Job) == 1


def test_the_body_field_follows_the_same_rules(env):
    body = _body(env, env.upload(good_zip()).json["id"]) | {"idempotency_key": "body-1"}
    first = _post(env, body)
    assert first.status_code == 201
    assert _post(env, body).json["id"] == first.json["id"]
    assert _post(env, body, "body-1").status_code == 200  # the header naming the same key is the same request
    r = _post(env, body | {"method": "dreambooth", "hyperparameters": {"instance_prompt": "a sks dog"}})
    assert (r.status_code, r.json["error"]["reason"], r.json["error"]["field"]) == \
        (409, "idempotency_conflict", "idempotency_key")


def test_a_header_and_body_that_disagree_or_an_overlong_key_are_400s(env):
    body = _body(env, env.upload(good_zip()).json["id"])
    r = _post(env, body | {"idempotency_key": "one"}, "two")
    assert r.status_code == 400 and r.json["error"]["field"] == "Idempotency-Key"
    r = _post(env, body, "k" * 201)
    assert (r.status_code, r.json["error"]["field"], r.json["error"]["maximum"]) == (400, "Idempotency-Key", 200)
    assert env.count(Job) == 0
