"""The served ``/openapi.json`` is generated from the records the server validates with, and holds to them.

Drift fails here: the committed ``docs/openapi.json`` (``python -m gate.api.openapi > docs/openapi.json``) must be
the document served for the default settings; every Flask route must be documented with an operationId and a
tag; every request body must document exactly its record's fields; the hyperparameters must carry the platform
limits the app is configured with, as the server enforces them. ``tests/test_fuzz.py`` runs Schemathesis on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from openapi_spec_validator import validate
from test_api import Env, good_zip

from alignment.config import AlignConfig
from auditing.config import json_schema
from gate.api.openapi import BODIES, openapi_document
from gate.pipeline.profile import AuditProfile
from gate.service.pagination import MAX_LIMIT
from gate.settings import Limits
from gate.training.settings import SETTINGS

ROOT = Path(__file__).parents[1]
COMMITTED = ROOT / "docs" / "openapi.json"


@pytest.fixture
def env(tmp_path, migrated) -> Env:
    return Env(tmp_path, migrated)


def _resolve(doc: dict, ref: str) -> dict:
    assert ref.startswith("#/components/schemas/"), ref
    return doc["components"]["schemas"][ref.rpartition("/")[2]]


def _refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_the_committed_document_is_the_one_served_for_the_default_settings(tmp_path, migrated):
    env = Env(tmp_path, migrated, limits=Limits())
    served = env.client.get("/openapi.json").json
    assert served == json.loads(COMMITTED.read_text()), \
        "docs/openapi.json is stale: python -m gate.api.openapi > docs/openapi.json"
    printed = subprocess.run([sys.executable, "-m", "gate.api.openapi"], capture_output=True, text=True, check=True,
                             cwd=ROOT).stdout
    assert json.loads(printed) == served


def test_the_document_is_valid_openapi_31_and_every_reference_resolves():
    doc = openapi_document()
    validate(doc)
    for ref in _refs(doc):
        _resolve(doc, ref)


def test_every_route_is_documented_with_an_operation_id_and_a_tag(env):
    doc = env.client.get("/openapi.json").json
    routes = set()
    for rule in env.app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith("web."):  # HTML pages (docs/reviewer-pages.md)
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        routes |= {(path, method.lower()) for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert documented == routes
    tags = {tag["name"] for tag in doc["tags"]}
    ids = [doc["paths"][path][method]["operationId"] for path, method in sorted(documented)]
    assert len(set(ids)) == len(ids) and all(ids)
    for path, method in documented:
        operation = doc["paths"][path][method]
        assert operation["tags"] and set(operation["tags"]) <= tags, (path, method)


def test_every_request_body_documents_exactly_its_records_fields():
    doc = openapi_document()
    schemas = doc["components"]["schemas"]
    bodies = [op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rpartition("/")[2]
              for item in doc["paths"].values() for op in item.values()
              if "application/json" in op.get("requestBody", {}).get("content", {})]
    assert sorted(bodies) == sorted(BODIES)
    for name, cls in {**BODIES, **{c.__name__: c for c in SETTINGS.values()}, "AuditProfile": AuditProfile}.items():
        schema = schemas[name]
        names = [f.name for f in fields(cls)]
        assert set(schema["properties"]) == set(names), name
        required = {n for n, info in cls.__pydantic_fields__.items() if info.is_required()}
        assert set(schema.get("required", [])) == required, name
        assert schema["additionalProperties"] is False, name  # unknown fields are refused (tests/test_api.py)
    assert schemas["Hyperparameters"]["anyOf"] == [{"$ref": f"#/components/schemas/{cls.__name__}"}
                                                   for cls in SETTINGS.values()]
    assert _resolve(doc, schemas["JobRequest"]["properties"]["hyperparameters"]["$ref"]) is \
        schemas["Hyperparameters"]


def test_nested_records_are_components_of_their_own():
    """The audit profile (with us_classifier, us_classifier_options and dtype, which the server accepts) and the
    hardening config are their records' schemas, referenced from the bodies that carry them."""
    schemas = openapi_document()["components"]["schemas"]
    profile = schemas["AuditProfile"]
    assert {"us_classifier", "us_classifier_options", "dtype"} <= set(profile["properties"])
    assert set(profile["properties"]) == set(json_schema(AuditProfile)["properties"])
    assert schemas["BaseModelRequest"]["properties"]["audit_profile"] == {"$ref": "#/components/schemas/AuditProfile"}
    assert schemas["AlignmentRequest"]["properties"]["config"]["$ref"] == "#/components/schemas/AlignConfig"
    assert set(schemas["AlignConfig"]["properties"]) == set(json_schema(AlignConfig)["properties"])


def test_query_parameters_carry_their_records_bounds():
    doc = openapi_document()
    (limit, cursor) = doc["paths"]["/v1/jobs"]["get"]["parameters"]
    assert (limit["name"], limit["schema"]["minimum"], limit["schema"]["maximum"]) == ("limit", 1, MAX_LIMIT)
    assert (cursor["name"], cursor["required"], cursor["schema"]["type"]) == ("cursor", False, "string")
    after = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["parameters"][1]
    assert (after["name"], after["in"], after["schema"]) == ("after", "query",
                                                             {"default": 0, "minimum": 0, "type": "integer"})


LIMITS = Limits(max_steps=77, max_rank=9, max_learning_rate=0.002, max_resolution=256, max_batch_size=3,
                max_class_images=11, max_caption_chars=40)
# hyperparameter, the limit's field, the value just over it
OVER = [("steps", "max_steps", 78), ("rank", "max_rank", 10), ("learning_rate", "max_learning_rate", 0.003),
        ("resolution", "max_resolution", 264), ("batch_size", "max_batch_size", 4),
        ("num_class_images", "max_class_images", 12), ("instance_prompt", "max_caption_chars", "x" * 41),
        ("class_prompt", "max_caption_chars", "x" * 41), ("validation_prompt", "max_caption_chars", "x" * 41)]


@pytest.mark.parametrize("name, limit, over", OVER, ids=[name for name, *_ in OVER])
def test_the_served_hyperparameters_carry_the_configured_limits_the_server_enforces(tmp_path, migrated, name, limit,
                                                                                     over):
    env = Env(tmp_path, migrated, limits=LIMITS)
    schemas = env.client.get("/openapi.json").json["components"]["schemas"]
    method = "lora" if name in SETTINGS["lora"].__dataclass_fields__ else "dreambooth"
    prop = schemas[SETTINGS[method].__name__]["properties"][name]
    bound = next((b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"))
    key = "maxLength" if isinstance(over, str) else "maximum"
    assert bound[key] == getattr(LIMITS, limit) and limit in prop["description"]
    base = {"instance_prompt": "a sks dog"} if method == "dreambooth" else {}
    dataset = env.upload(good_zip()).json["id"]
    r = env.job(dataset, method=method, hyperparameters={**base, name: over})
    error = r.json["error"]
    assert (r.status_code, error["field"], error["limit"], error["maximum"]) == \
        (400, f"hyperparameters.{name}", limit, getattr(LIMITS, limit)), error
    at_limit = over[:-1] if isinstance(over, str) else getattr(LIMITS, limit)
    assert env.job(dataset, method=method, hyperparameters={**base, name: at_limit}).status_code == 201
