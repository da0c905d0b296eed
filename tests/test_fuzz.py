"""Schemathesis against the API's served ``/openapi.json``: every operation, fed generated valid and invalid
requests as a customer, an operator and a reviewer, must answer without a 5xx, with a status code the
document lists for it, and with a body that matches the documented schema.

The app is the real one (``create_app`` through ``tests/test_api.Env``: a migrated SQLite database, the
recording dispatcher, the fake scanner), driven in process over WSGI, with rows in every interesting state
(a released, a flagged and a withheld job with their checkpoints and reports, a flagged dataset, a hardening
run) so that the generated requests reach them as well as missing ids. Examples per operation are bounded so
the whole run stays within CI's time. (Schemathesis' pytest fixture loader does not run under pytest 9, so each
operation's Hypothesis strategies are driven here directly.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_api import Env, good_zip
from test_api_results import alignment_config, dataset_of, make_job

from gate.api.openapi import openapi_document
from gate.storage.models import AlignmentRun

EXAMPLES_PER_OPERATION = 30
ROLES = ("a", "op", "rev")  # customer, operator, reviewer
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPERATIONS = [(path, method) for path, methods in openapi_document()["paths"].items() for method in methods]


@pytest.fixture
def env(tmp_path, migrated) -> Env:
    env = Env(tmp_path, migrated)
    with env.sessions() as s:
        run = AlignmentRun(name="harden the world", config=alignment_config())
        s.add(run)
        s.commit()
    flagged = env.upload(good_zip(n=20, red=1)).json["id"]
    env.real_ids = {"dataset_id": [dataset_of(env), flagged], "base_model_id": [env.base_model_id], "run_id": [run.id],
                    "seq": [1],
                    "job_id": [make_job(env, "queued"), make_job(env, "released", checkpoint=b"released weights"),
                               make_job(env, "review", checkpoint=b"flagged weights"),
                               make_job(env, "withheld", checkpoint=b"blocked weights")]}
    # Requests the API accepts, so that success responses are checked against the document too.
    in_review = env.real_ids["job_id"][2]
    env.accepted = {
        ("/v1/datasets", "post"): {"body": {"file": good_zip(), "name": "fuzzed"}},
        ("/v1/jobs", "post"): {"body": {"base_model": env.base_model_id, "dataset": env.real_ids["dataset_id"][0],
                                        "method": "lora", "hyperparameters": {"steps": 10, "rank": 2},
                                        "idempotency_key": "fuzz"}},
        ("/v1/reviews/{job_id}", "post"): {"body": {"decision": "approve", "reason": "looked at every image"},
                                           "path_parameters": {"job_id": in_review}},
        ("/v1/datasets/{dataset_id}/review", "post"): {"body": {"decision": "accept", "reason": "a false positive"},
                                                       "path_parameters": {"dataset_id": flagged}},
        ("/v1/alignments", "post"): {"body": {"name": "fuzzed", "config": alignment_config()}},
    }
    return env


def cases(operation, env: Env):
    """Valid and invalid requests, with generated path ids and with each real row's id, and with a body the
    API accepts where it takes one."""
    strategies = [operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)]
    for name in (p.name for p in operation.path_parameters):
        strategies += [operation.as_strategy(GenerationMode.POSITIVE, path_parameters={name: value})
                       for value in env.real_ids[name]]
    accepted = env.accepted.get((operation.path, operation.method))
    if accepted is not None:
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE, **accepted))
    return st.one_of(strategies)


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m.upper()} {p}" for p, m in OPERATIONS])
def test_every_response_is_documented_and_no_request_breaks_the_server(path, method, env):
    operation = schemathesis.openapi.from_wsgi("/openapi.json", env.app)[path][method]

    @given(case=cases(operation, env))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def every_role(case):
        for who in ROLES:
            case.call_and_validate(headers=env.headers(who), checks=CHECKS)

    every_role()
