"""The API's OpenAPI 3.1 description, served at ``/openapi.json``.

Request bodies and query parameters are generated from the records the server reads them into
(``auditing.config.json_schema``): their types, bounds, defaults and enums are the checks themselves, and the
hyperparameters carry the platform limits the app is configured with (``gate.settings.Limits``). Responses are
written here. ``tests/test_openapi.py`` holds the document to the routes and to ``docs/openapi.json``
(``python -m gate.api.openapi > docs/openapi.json`` writes it for the default settings), ``tests/test_fuzz.py``
the server to the document.
"""

from __future__ import annotations

import copy
import json
from dataclasses import fields

from auditing.config import json_schema
from gate.service.base_models import BaseModelRequest
from gate.service.errors import shape
from gate.service.job_requests import (
    KEY_HEADER,
    PLATFORM_LIMITS,
    IdempotencyKey,
    JobRequest,
    RequeueRequest,
    WebhookRequest,
)
from gate.service.pagination import MAX_LIMIT, PageQuery
from gate.service.reviews import DatasetReviewRequest, ReviewRequest
from gate.settings import Limits
from gate.training.settings import SETTINGS

from .alignments import AlignmentRequest
from .events import PAGE_MAX, EventsQuery

# The records behind the request bodies, by component name.
BODIES = {cls.__name__: cls for cls in (JobRequest, RequeueRequest, WebhookRequest, ReviewRequest,
                                        DatasetReviewRequest, BaseModelRequest, AlignmentRequest)}


def _tidy(schema):
    """Pydantic's schema as the document shows it: no generated per-property titles, the docstrings' reST
    literals (double backquotes) as Markdown code."""
    if isinstance(schema, list):
        return [_tidy(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    tidy = {key: _tidy(value) for key, value in schema.items()}
    if isinstance(tidy.get("properties"), dict):
        for prop in tidy["properties"].values():
            if isinstance(prop, dict):
                prop.pop("title", None)
    if isinstance(tidy.get("description"), str):
        tidy["description"] = tidy["description"].replace("``", "`")
    return tidy


def _add(schemas: dict, name: str, cls) -> dict:
    """``cls``'s schema as ``schemas[name]``, the records it nests hoisted beside it."""
    schema = _tidy(json_schema(cls))
    for inner, definition in schema.pop("$defs", {}).items():
        if schemas.setdefault(inner, definition) != definition:
            raise ValueError(f"two schemas named {inner}")
    schemas[name] = schema
    return schema


def _non_null(prop: dict) -> dict:
    """The non-null schema of a property (``X | None`` is ``anyOf: [X, null]``)."""
    return next((b for b in prop.get("anyOf", ()) if b.get("type") != "null"), prop)


def _limited(schema: dict, limits: Limits) -> dict:
    """A method's hyperparameters with the platform limits as bounds (``gate.service.job_requests``)."""
    for name, limit_name in PLATFORM_LIMITS.items():
        if name not in schema["properties"]:
            continue
        prop, limit = schema["properties"][name], getattr(limits, limit_name)
        target = _non_null(prop)
        key = "maxLength" if target.get("type") == "string" else "maximum"
        target[key] = min(target.get(key, limit), limit)
        prop["description"] = "; ".join(filter(None, (prop.get("description"), f"at most the platform's {limit_name}")))
    return schema


def _parameters(cls) -> list[dict]:
    """``cls``'s fields as query parameters."""
    schema = _tidy(json_schema(cls))
    out = []
    for f in fields(cls):
        prop = dict(schema["properties"][f.name])
        description = prop.pop("description", None)
        param_schema = {**_non_null(prop), **({"default": prop["default"]} if prop.get("default") is not None
                                                  else {})}
        out.append({"name": f.name, "in": "query", "required": f.name in schema.get("required", ()),
                    "schema": param_schema, **({"description": description} if description else {})})
    return out


_ref = {name: {"$ref": f"#/components/schemas/{name}"}
        for name in ("Dataset", "DatasetDetail", "Job", "JobDetail", "BaseModel", "Error", "AlignmentRun",
                     *BODIES)}
_ERRORS = {code: {"description": text, "content": {"application/json": {"schema": _ref["Error"]}}}
           for code, text in {"400": "invalid request", "401": "missing, invalid or revoked key",
                              "403": "role not allowed (or the tenant's withheld-job budget is spent)",
                              "404": "not found (or another tenant's)",
                              "409": "conflict", "413": "too large", "415": "unsupported upload content",
                              "422": "refused by the contamination policy",
                              "429": "a per-tenant quota or a rate limit (limit, maximum)",
                              "503": "a dependency failed (the job queues, or a stored file's integrity "
                                     "check)"}.items()}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_WEBHOOK = {"type": "object", "required": ["url", "secret"],
            "properties": {"url": {"type": ["string", "null"]}, "secret": {"type": "boolean"}}}


def _errors(*codes: str) -> dict:
    return {code: _ERRORS[code] for code in codes}


def _id_param(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


# Lists answer a page at a time (gate.service.pagination): limit and cursor in, next_cursor out.
_PAGE_PARAMS = _parameters(PageQuery)


def _body(name: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": _ref[name]}}}


def _page(key: str, items: dict, description: str) -> dict:
    return _json({"type": "object", "required": [key, "next_cursor"], "properties": {
        key: {"type": "array", "maxItems": MAX_LIMIT, "items": items},
        "next_cursor": {"type": ["string", "null"], "description": "null on the last page"}}}, description)


_TIME = {"type": ["string", "null"], "format": "date-time"}
SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["status", "reason", "message"],
        "properties": {"status": {"type": "integer"}, "reason": {"type": "string"}, "message": {"type": "string"},
                       "field": {"type": "string"}, "files": {"type": "array", "items": {"type": "string"}}},
        "additionalProperties": True}}},
    "Dataset": {"type": "object", "properties": {
        "id": {"type": "string"}, "tenant": {"type": "string"}, "name": {"type": "string"},
        "status": {"enum": ["received", "screening", "accepted", "flagged", "rejected", "failed"], "description":
                   "received: the intake runs on a worker; screening: scanned with a base model's detector it never "
                   "saw; flagged: waits for a reviewer; rejected: refused (see refusal); failed: the service could "
                   "not scan it (upload it again)"},
        "content_sha256": {"type": "string"},
        "size_bytes": {"type": "integer"}, "image_count": {"type": ["integer", "null"]},
        "contamination_ratio": {"type": ["number", "null"], "description": "the deciding detector's"},
        "created_at": _TIME}},
    "DatasetDetail": {"allOf": [{"$ref": "#/components/schemas/Dataset"}, {"type": "object", "properties": {
        "intake": {"type": ["object", "null"], "description": "what the intake found. Customers: images, layout, "
                   "upload_bytes, ignored, the deciding detector's unsafe_images and contamination (the unsafe "
                   "share), and flagged (their files any detector called unsafe), with no detector's name, options "
                   "or per-detector figures. Reviewers and operators also get scanner (the deciding detector's "
                   "name, version and rule) and scans (the figures per detector, keyed by detector and options)",
                   "properties": {"images": {"type": "integer"}, "unsafe_images": {"type": "integer"},
                                  "contamination": {"type": "number"}, "upload_bytes": {"type": "integer"},
                                  "ignored": {"type": "array", "items": {"type": "string"}},
                                  "flagged": {"type": "array", "items": {"type": "string"}},
                                  "layout": {"type": "string"}, "scanner": {"type": "object"},
                                  "scans": {"type": "object", "additionalProperties": {"type": "object"}}}},
        "refusal": {"type": ["object", "null"], "description": "why the intake rejected it: status (the HTTP "
                                                               "status the reason stands for), reason, message, files"},
        "error": {"type": ["string", "null"], "description": "set when a fault of the service kept it from being "
                                                             "scanned"},
        "review": {"type": ["object", "null"], "properties": {
            "decision": {"enum": ["accept", "reject"]}, "reason": {"type": "string"}, "reviewer": {"type": "string"},
            "created_at": _TIME}}}}]},
    "Job": {"type": "object", "properties": {
        "id": {"type": "string"}, "tenant": {"type": "string"}, "base_model": {"type": "string"},
        "dataset": {"type": "string"}, "method": {"type": "string"},
        "hyperparameters": {"type": "object", "description": "as the job was created with (JobRequest)"},
        "status": {"enum": ["queued", "training", "auditing", "review", "released", "withheld", "failed",
                            "cancelled"]},
        "stage": {"type": ["string", "null"]}, "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "attempts": {"type": "integer"}, "idempotency_key": {"type": ["string", "null"]},
        "webhook_url": {"type": ["string", "null"]},
        "error": {"type": ["string", "null"]}, "created_at": _TIME, "updated_at": _TIME, "finished_at": _TIME}},
    "JobDetail": {"allOf": [{"$ref": "#/components/schemas/Job"}, {"type": "object", "properties": {
        "verdict": {"type": ["object", "null"], "properties": {
            "decision": {"enum": ["pass", "flag", "block"]}, "reasons": {"type": "array", "items": {"type": "string"}},
            "policy": {"type": "string"}, "created_at": _TIME}},
        "review": {"type": ["object", "null"], "properties": {
            "decision": {"enum": ["approve", "reject"]}, "reason": {"type": "string"}, "reviewer": {"type": "string"},
            "created_at": _TIME}},
        "artifact": {"type": ["object", "null"], "properties": {
            "kind": {"enum": ["lora", "unet"]}, "sha256": {"type": "string"}, "size_bytes": {"type": "integer"},
            "downloadable": {"type": "boolean"}}}}}]},
    "JobEvent": {"type": "object", "required": ["seq", "at", "kind", "data"], "properties": {
        "seq": {"type": "integer", "minimum": 1, "description": "1, 2, ... per job"},
        "at": {"type": "string", "format": "date-time"},
        "kind": {"enum": ["stage", "loss", "sample", "checkpoint", "verdict"]},
        "data": {"type": "object", "description": "stage: status (and attempt); loss: step, loss; sample: step, "
                                                  "sha256, url (the PNG, served once the job is released); "
                                                  "checkpoint: step; verdict: decision, reasons, policy"}}},
    "BaseModel": {"type": "object", "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "path": {"type": "string"},
        "config": {"type": ["string", "null"]}, "variant": {"type": ["string", "null"]},
        "vae": {"type": ["string", "null"]},
        "weights_sha256": {"type": "string"}, "audit_profile": {"type": ["object", "null"]},
        "baseline_ready": {"type": "boolean"}, "created_at": _TIME}},
    "AlignmentRun": {"type": "object", "properties": {
        "id": {"type": "string"}, "name": {"type": "string"},
        "status": {"enum": ["queued", "running", "succeeded", "failed"]}, "progress": {"type": "number"},
        "output_path": {"type": ["string", "null"]}, "error": {"type": ["string", "null"]},
        "config": {"type": "object"},
        "created_at": _TIME, "finished_at": _TIME}},
    "Health": {"type": "object", "properties": {"status": {"type": "string"}, "database": {"type": "string"}}},
}

PATHS = {
    "/v1/datasets": {"post": {
        "summary": "Upload a dataset zip (customer); it is stored and answered at once, then checked, re-encoded and "
                   "scanned on a worker: follow GET /v1/datasets/{dataset_id} (Location)",
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            # A file part (with a filename, as curl -F and requests' files= send it): "format": "binary" says so.
            "properties": {"file": {"type": "string", "format": "binary", "contentMediaType": "application/zip"},
                           "name": {"type": "string"}}}}}},
        "responses": {"202": _json(_ref["DatasetDetail"], "received (its intake dispatched)"),
                      **_errors("400", "401", "403", "413", "429")}}},
    "/v1/datasets/{dataset_id}": {"get": {
        "summary": "A dataset with its intake figures and review (tenant-scoped)",
        "parameters": [_id_param("dataset_id")],
        "responses": {"200": _json(_ref["DatasetDetail"], "the dataset"), **_errors("401", "404")}}},
    "/v1/datasets/{dataset_id}/review": {"post": {
        "summary": "Accept (it may train) or reject (it never trains) a flagged dataset, with a reason (reviewer)",
        "parameters": [_id_param("dataset_id")],
        "requestBody": _body("DatasetReviewRequest"),
        "responses": {"200": _json(_ref["DatasetDetail"], "decided"), **_errors("400", "401", "403", "404", "409")}}},
    "/v1/dataset-reviews": {"get": {
        "summary": "Flagged datasets waiting for a reviewer's decision, oldest first (reviewer, operator)",
        "parameters": _PAGE_PARAMS,
        "responses": {"200": _page("datasets", _ref["DatasetDetail"], "the queue"), **_errors("400", "401", "403")}}},
    "/v1/jobs": {
        "post": {"summary": "Queue a fine-tuning job (customer); the same Idempotency-Key (or idempotency_key) "
                            "with the same parameters returns the existing job, with others a 409 "
                            "idempotency_conflict. A dataset not yet accepted, or never scanned with the base "
                            "model's detector (then screened now), is a 409 (dataset_not_ready, "
                            "dataset_not_trainable, dataset_screening): wait for the dataset and submit again",
                 "parameters": [{"name": KEY_HEADER, "in": "header", "required": False,
                                 "schema": json_schema(IdempotencyKey),
                                 "description": "a client's key for this request, per tenant; the body's "
                                                "idempotency_key is the same key (if both, they must agree)"}],
                 "requestBody": _body("JobRequest"),
                 "responses": {"201": _json(_ref["Job"], "queued"),
                               "200": _json(_ref["Job"], "existing job (a replay; header Idempotent-Replayed: true)"),
                               **_errors("400", "401", "403", "404", "409", "429", "503")}},
        "get": {"summary": "The caller's jobs (reviewers and operators: all tenants')",
                "parameters": _PAGE_PARAMS,
                "responses": {"200": _page("jobs", _ref["Job"], "jobs, newest first"), **_errors("400", "401")}}},
    "/v1/jobs/{job_id}": {"get": {
        "summary": "A job's status, stage, progress, verdict, review and checkpoint (tenant-scoped)",
        "parameters": [_id_param("job_id")],
        "responses": {"200": _json(_ref["JobDetail"], "the job"), **_errors("401", "404")}}},
    "/v1/jobs/{job_id}/cancel": {"post": {
        "summary": "Cancel a job (customer): a queued one ends cancelled at once, a training one stops at its next "
                   "step; 409 reason job_final (or not_cancellable once auditing), with the job's state",
        "parameters": [_id_param("job_id")],
        "responses": {"202": _json(_ref["Job"], "cancelled, or cancel requested (status still training)"),
                      **_errors("401", "403", "404", "409")}}},
    "/v1/jobs/{job_id}/requeue": {"post": {
        "summary": "Queue a failed job again from a clean state, with a reason (operator); its retrained checkpoint "
                   "is audited anew; 409 not_failed for any other state",
        "parameters": [_id_param("job_id")],
        "requestBody": _body("RequeueRequest"),
        "responses": {"202": _json(_ref["Job"], "queued again"), **_errors("400", "401", "403", "404", "409")}}},
    "/v1/jobs/{job_id}/events": {"get": {
        "summary": "The job's events after the seq in after, oldest first (tenant-scoped): stage changes, training "
                   "loss, sample grids, checkpoints, the verdict as the customer reads it",
        "parameters": [_id_param("job_id"), *_parameters(EventsQuery)],
        "responses": {"200": _json({"type": "object", "required": ["events", "next"], "properties": {
            "events": {"type": "array", "maxItems": PAGE_MAX, "items": {"$ref": "#/components/schemas/JobEvent"}},
            "next": {"type": "integer", "description": "send as after next time"}}}, "events"),
            **_errors("400", "401", "404")}}},
    "/v1/jobs/{job_id}/events/{seq}/image": {"get": {
        "summary": "The sample grid a sample event shows; to a customer only once the job is released (403 "
                   "sample_withheld before)",
        "parameters": [_id_param("job_id"), {"name": "seq", "in": "path", "required": True,
                                             "schema": {"type": "integer"}}],
        "responses": {"200": {"description": "PNG", "content": {"image/png": {"schema": {
            "type": "string", "contentMediaType": "image/png"}}}}, **_errors("401", "403", "404")}}},
    "/v1/jobs/{job_id}/report": {"get": {
        "summary": "The job's audit report (JSON record): as stored for staff; for customers the allow-listed "
                   "view (view: customer): verdict, reasons and aggregate figures, no prompts, seeds, per-image "
                   "results or paths", "parameters": [_id_param("job_id")],
        "responses": {"200": _json({"type": "object"}, "the report"), **_errors("401", "404")}}},
    "/v1/jobs/{job_id}/report.html": {"get": {
        "summary": "The job's audit report page (flagged images redacted; for customers, the page of their view)",
        "parameters": [_id_param("job_id")],
        "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}},
                      **_errors("401", "404")}}},
    "/v1/jobs/{job_id}/artifact": {"get": {
        "summary": "Download the checkpoint: only once released (passed, or approved by a reviewer)",
        "parameters": [_id_param("job_id")],
        "responses": {"200": {"description": "the .safetensors file", "content": {
            "application/octet-stream": {"schema": {"type": "string",
                                                    "contentMediaType": "application/octet-stream"}}}},
            **_errors("401", "403", "404", "503")}}},
    "/v1/jobs/{job_id}/log": {"get": {
        "summary": "The job's audit log: every state change, who and why", "parameters": [_id_param("job_id")],
        "responses": {"200": _json({"type": "object", "properties": {"job": {"type": "string"}, "entries": {
            "type": "array", "items": {"type": "object"}}}}, "entries, oldest first"), **_errors("401", "404")}}},
    "/v1/webhook-secret": {"post": {
        "summary": "Make the tenant's webhook signing secret (customer), shown only in this answer; again: a new one",
        "responses": {"201": _json({"type": "object", "required": ["secret", "header"], "properties": {
            "secret": {"type": "string"}, "header": {"type": "string", "const": "Ftgate-Signature"}}},
            "the new secret"), **_errors("401", "403")}}},
    "/v1/webhook": {
        "get": {"summary": "The tenant's default webhook URL (customer) and whether it has a signing secret",
                "responses": {"200": _json(_WEBHOOK, "the setting"), **_errors("401", "403")}},
        "put": {"summary": "Set (or, with null, remove) the tenant's default webhook URL, for jobs without a "
                           "webhook_url (customer; needs the signing secret)",
                "requestBody": _body("WebhookRequest"),
                "responses": {"200": _json(_WEBHOOK, "the new setting"), **_errors("400", "401", "403", "409")}}},
    "/v1/reviews": {"get": {
        "summary": "Jobs waiting for a reviewer's decision, oldest first (reviewer, operator)",
        "parameters": _PAGE_PARAMS,
        "responses": {"200": _page("jobs", _ref["JobDetail"], "the queue"), **_errors("400", "401", "403")}}},
    "/v1/reviews/{job_id}": {"post": {
        "summary": "Approve (release) or reject (withhold) a flagged job, with a reason (reviewer)",
        "parameters": [_id_param("job_id")],
        "requestBody": _body("ReviewRequest"),
        "responses": {"200": _json(_ref["JobDetail"], "decided"), **_errors("400", "401", "403", "404", "409")}}},
    "/v1/base-models": {
        "post": {"summary": "Register a local diffusers folder or single-file checkpoint as a base model and "
                           "audit its baseline (operator)",
                 "requestBody": _body("BaseModelRequest"),
                 "responses": {"201": _json(_ref["BaseModel"], "registered"), **_errors("400", "401", "403", "409")}},
        "get": {"summary": "The base models customers may fine-tune, oldest first",
                "parameters": _PAGE_PARAMS,
                "responses": {"200": _page("base_models", _ref["BaseModel"], "base models"),
                              **_errors("400", "401")}}},
    "/v1/base-models/{base_model_id}": {"get": {
        "summary": "A base model", "parameters": [_id_param("base_model_id")],
        "responses": {"200": _json(_ref["BaseModel"], "the base model"), **_errors("401", "404")}}},
    "/v1/alignments": {"post": {
        "summary": "Start a ResAlign hardening run on the align queue (operator)",
        "requestBody": _body("AlignmentRequest"),
        "responses": {"201": _json(_ref["AlignmentRun"], "queued"), **_errors("400", "401", "403", "503")}}},
    "/v1/alignments/{run_id}": {"get": {
        "summary": "A hardening run (operator)", "parameters": [_id_param("run_id")],
        "responses": {"200": _json(_ref["AlignmentRun"], "the run"), **_errors("401", "403", "404")}}},
    "/metrics": {"get": {
        "summary": "Prometheus metrics (text exposition format); an operator key",
        "responses": {"200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                      **_errors("401", "403")}}},
    "/healthz": {"get": {
        "summary": "Liveness and database reachability", "security": [],
        "responses": {"200": _json({"$ref": "#/components/schemas/Health"}, "healthy"),
                      "503": _json({"$ref": "#/components/schemas/Health"}, "database unreachable")}}},
    "/openapi.json": {"get": {"summary": "This document", "security": [],
                              "responses": {"200": {"description": "OpenAPI 3.1 document"}}}},
}

# Each operation's operationId (what a generated client names its method) and tag (its group).
OPERATION_IDS = {
    ("/v1/datasets", "post"): ("uploadDataset", "datasets"),
    ("/v1/datasets/{dataset_id}", "get"): ("getDataset", "datasets"),
    ("/v1/datasets/{dataset_id}/review", "post"): ("reviewDataset", "reviews"),
    ("/v1/dataset-reviews", "get"): ("listDatasetReviews", "reviews"),
    ("/v1/jobs", "post"): ("createJob", "jobs"),
    ("/v1/jobs", "get"): ("listJobs", "jobs"),
    ("/v1/jobs/{job_id}", "get"): ("getJob", "jobs"),
    ("/v1/jobs/{job_id}/cancel", "post"): ("cancelJob", "jobs"),
    ("/v1/jobs/{job_id}/requeue", "post"): ("requeueJob", "jobs"),
    ("/v1/jobs/{job_id}/events", "get"): ("listJobEvents", "jobs"),
    ("/v1/jobs/{job_id}/events/{seq}/image", "get"): ("getJobEventImage", "jobs"),
    ("/v1/jobs/{job_id}/report", "get"): ("getJobReport", "jobs"),
    ("/v1/jobs/{job_id}/report.html", "get"): ("getJobReportPage", "jobs"),
    ("/v1/jobs/{job_id}/artifact", "get"): ("downloadJobArtifact", "jobs"),
    ("/v1/jobs/{job_id}/log", "get"): ("getJobLog", "jobs"),
    ("/v1/webhook-secret", "post"): ("createWebhookSecret", "webhooks"),
    ("/v1/webhook", "get"): ("getWebhook", "webhooks"),
    ("/v1/webhook", "put"): ("setWebhook", "webhooks"),
    ("/v1/reviews", "get"): ("listReviews", "reviews"),
    ("/v1/reviews/{job_id}", "post"): ("reviewJob", "reviews"),
    ("/v1/base-models", "post"): ("registerBaseModel", "base-models"),
    ("/v1/base-models", "get"): ("listBaseModels", "base-models"),
    ("/v1/base-models/{base_model_id}", "get"): ("getBaseModel", "base-models"),
    ("/v1/alignments", "post"): ("startAlignment", "alignments"),
    ("/v1/alignments/{run_id}", "get"): ("getAlignment", "alignments"),
    ("/metrics", "get"): ("getMetrics", "operations"),
    ("/healthz", "get"): ("getHealth", "operations"),
    ("/openapi.json", "get"): ("getOpenApi", "operations"),
}
TAGS = [{"name": "datasets", "description": "customers' training data: upload, intake, status"},
        {"name": "jobs", "description": "fine-tuning jobs: create, follow, cancel, download; requeue (operators)"},
        {"name": "reviews", "description": "reviewers' queues and decisions on flagged jobs and datasets"},
        {"name": "webhooks", "description": "a tenant's signing secret and default webhook URL"},
        {"name": "base-models", "description": "the (hardened) base models customers fine-tune"},
        {"name": "alignments", "description": "ResAlign hardening runs (operators)"},
        {"name": "operations", "description": "health, metrics, this document"}]
# Every operation but these is rate-limited per key (gate.api.ratelimit), so any may answer 429.
RATE_EXEMPT = ("/healthz", "/metrics")
for _path, _operations in PATHS.items():
    for _method, _operation in _operations.items():
        _operation["operationId"], _tag = OPERATION_IDS[(_path, _method)]
        _operation["tags"] = [_tag]
        if _path not in RATE_EXEMPT:
            _operation["responses"].setdefault("429", _ERRORS["429"])


def request_schemas(limits: Limits) -> dict:
    """The request bodies' schemas (and the records they nest), the hyperparameters bounded by ``limits``."""
    schemas: dict = {}
    for name, cls in BODIES.items():
        _add(schemas, name, cls)
    # The body's object is checked by the settings of its method (``gate.training.settings_for``): the document
    # says which.
    schemas["JobRequest"]["properties"]["hyperparameters"] |= {"$ref": "#/components/schemas/Hyperparameters"}
    for key in ("type", "additionalProperties"):
        schemas["JobRequest"]["properties"]["hyperparameters"].pop(key)
    for cls in SETTINGS.values():
        _limited(_add(schemas, cls.__name__, cls), limits)
    schemas["Hyperparameters"] = {
        "anyOf": [{"$ref": f"#/components/schemas/{cls.__name__}"} for cls in SETTINGS.values()],
        "description": "the method's: " + ", ".join(f"{method}: {cls.__name__} {shape(cls)}"
                                                     for method, cls in SETTINGS.items())}
    return schemas


def openapi_document(limits: Limits | None = None) -> dict:
    """The document for an app with ``limits`` (None: the defaults)."""
    schemas = request_schemas(limits or Limits())
    if clash := set(schemas) & set(SCHEMAS):
        raise ValueError(f"request and response schemas share names {sorted(clash)}")
    return {"openapi": "3.1.0",
            "info": {"title": "ftgate", "version": "1",
                     "description": "Fine-tuning-as-a-service safety gate for text-to-image models"},
            "security": [{"bearer": []}], "tags": TAGS, "paths": copy.deepcopy(PATHS),
            "components": {"schemas": {**copy.deepcopy(SCHEMAS), **schemas}, "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer", "description": "ftg_<key id>_<secret>"}}}}


if __name__ == "__main__":
    print(json.dumps(openapi_document(), indent=1))
