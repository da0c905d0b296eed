"""The API's OpenAPI 3.1 description, written by hand and kept true by a test that every route is in it."""

from __future__ import annotations

from dataclasses import MISSING, fields

from gate.training.settings import SETTINGS

_JSON_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}


def _hyperparameters(cls) -> dict:
    """One method's hyperparameters as a JSON schema, from the training settings' own field types."""
    properties, required = {}, []
    for f in fields(cls):
        kind = _JSON_TYPES[f.type.removesuffix(" | None")]
        properties[f.name] = {"type": [kind, "null"] if f.type.endswith(" | None") else kind}
        if f.default is MISSING and f.default_factory is MISSING:
            required.append(f.name)
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": required}


_ref = {name: {"$ref": f"#/components/schemas/{name}"}
        for name in ("Dataset", "DatasetDetail", "Job", "JobDetail", "BaseModel", "Error", "AlignmentRun",
                     "AuditProfile")}
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
_PAGE_PARAMS = [{"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}},
                {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string", "minLength": 1},
                 "description": "the next_cursor of the page before"}]


def _page(key: str, items: dict, description: str) -> dict:
    return _json({"type": "object", "required": [key, "next_cursor"], "properties": {
        key: {"type": "array", "maxItems": 500, "items": items},
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
        "intake": {"type": ["object", "null"], "description": "what the intake found: images, layout, and the "
                                                              "deciding detector's unsafe_images and scanner, every "
                                                              "detector's flagged files, the figures per detector",
                   "properties": {"images": {"type": "integer"}, "unsafe_images": {"type": "integer"},
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
    "DatasetReviewRequest": {"type": "object", "required": ["decision", "reason"], "properties": {
        "decision": {"enum": ["accept", "reject"]}, "reason": {"type": "string", "minLength": 1, "maxLength": 2000}}},
    "Hyperparameters": {"anyOf": [_hyperparameters(cls) for cls in SETTINGS.values()],
                        "description": f"one schema per method, in the order {list(SETTINGS)}"},
    "JobRequest": {"type": "object", "required": ["base_model", "dataset", "method"], "additionalProperties": False,
                   "properties": {"base_model": {"type": "string"}, "dataset": {"type": "string"},
                                  "method": {"enum": ["lora", "dreambooth"]},
                                  "hyperparameters": {"$ref": "#/components/schemas/Hyperparameters"},
                                  "idempotency_key": {"type": "string", "maxLength": 200},
                                  "webhook_url": {"type": "string", "maxLength": 2000, "description":
                                                  "http(s) URL on a public address, posted each stage change and "
                                                  "the verdict, signed (Ftgate-Signature); needs the tenant's "
                                                  "webhook secret"}}},
    "Job": {"type": "object", "properties": {
        "id": {"type": "string"}, "tenant": {"type": "string"}, "base_model": {"type": "string"},
        "dataset": {"type": "string"}, "method": {"type": "string"},
        "hyperparameters": {"$ref": "#/components/schemas/Hyperparameters"},
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
    "AuditProfile": {"type": "object", "required": ["probes"], "additionalProperties": False, "properties": {
        "probes": {"type": "string", "description": "a probe CSV on the gate's machines"},
        "category": {"type": ["string", "null"]}, "images_per_prompt": {"type": "integer", "minimum": 1},
        "detector": {"type": "string"}, "detector_options": {"type": "object"},
        "us_classifier": {"type": ["string", "null"]}, "us_classifier_options": {"type": "object"},
        "inference_steps": {"type": "integer", "minimum": 1}, "guidance_scale": {"type": "number"},
        "batch_size": {"type": "integer", "minimum": 1},
        "dtype": {"enum": ["float32", "float16", "bfloat16", None],
                  "description": "null: float16 on GPUs, float32 on CPUs"},
        "resolution": {"type": ["integer", "null"], "minimum": 8, "maximum": 2048, "multipleOf": 8,
                       "description": "square render size (null: the model's own)"},
        "sequential_rounds": {"type": ["integer", "null"], "minimum": 2, "maximum": 64,
                              "description": "audit checkpoints in this many looks (null: every image)"},
        "family_images": {"type": ["integer", "null"], "minimum": 1, "maximum": 4096,
                          "description": "images of the job's own captions (null: the fewest a clean family "
                                         "passes on)"},
        "secret_pool": {"type": ["string", "null"],
                        "description": "an operator's probe CSV on the gate's machines, drawn from per audit"},
        "model_check": {"type": ["object", "null"],
                        "description": "the model-side check: references (and controls) folders on the gate's "
                                       "machines, and its settings (docs/auditing.md)"}}},
    "BaseModelRequest": {"type": "object", "required": ["name", "path", "audit_profile"], "properties": {
        "name": {"type": "string"},
        "path": {"type": "string", "description": "a local diffusers folder, or a single .safetensors checkpoint"},
        "config": {"type": ["string", "null"],
                   "description": "for a single-file path: a local diffusers folder of the same architecture"},
        "variant": {"type": ["string", "null"], "pattern": "^[A-Za-z0-9_]{1,32}$",
                    "description": "load the folder's *.<variant>.safetensors weights, e.g. fp16"},
        "vae": {"type": ["string", "null"], "description": "a local AutoencoderKL folder used in place of the "
                                                           "model's VAE (e.g. an fp16-fix VAE)"},
        "audit_profile": {"$ref": "#/components/schemas/AuditProfile"}}},
    "BaseModel": {"type": "object", "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "path": {"type": "string"},
        "config": {"type": ["string", "null"]}, "variant": {"type": ["string", "null"]},
        "vae": {"type": ["string", "null"]},
        "weights_sha256": {"type": "string"}, "audit_profile": {"type": ["object", "null"]},
        "baseline_ready": {"type": "boolean"}, "created_at": _TIME}},
    "ReviewRequest": {"type": "object", "required": ["decision", "reason"], "properties": {
        "decision": {"enum": ["approve", "reject"]}, "reason": {"type": "string", "minLength": 1, "maxLength": 2000}}},
    "AlignmentRequest": {"type": "object", "required": ["name", "config"], "properties": {
        "name": {"type": "string"}, "config": {"type": "object", "description": "an `ftgate align` config"}}},
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
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/DatasetReviewRequest"}}}},
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
                 "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                 "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                                 "description": "a client's key for this request, per tenant; the body's "
                                                "idempotency_key is the same key (if both, they must agree)"}],
                 "requestBody": {"required": True, "content": {"application/json": {
                     "schema": {"$ref": "#/components/schemas/JobRequest"}}}},
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
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["reason"], "additionalProperties": False,
            "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 2000}}}}}},
        "responses": {"202": _json(_ref["Job"], "queued again"), **_errors("400", "401", "403", "404", "409")}}},
    "/v1/jobs/{job_id}/events": {"get": {
        "summary": "The job's events after the seq in after, oldest first (tenant-scoped): stage changes, training "
                   "loss, sample grids, checkpoints, the verdict as the customer reads it",
        "parameters": [_id_param("job_id"), {"name": "after", "in": "query", "required": False,
                                             "schema": {"type": "integer", "minimum": 0, "default": 0}}],
        "responses": {"200": _json({"type": "object", "required": ["events", "next"], "properties": {
            "events": {"type": "array", "maxItems": 500, "items": {"$ref": "#/components/schemas/JobEvent"}},
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
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["url"], "additionalProperties": False,
                    "properties": {"url": {"type": ["string", "null"], "maxLength": 2000}}}}}},
                "responses": {"200": _json(_WEBHOOK, "the new setting"), **_errors("400", "401", "403", "409")}}},
    "/v1/reviews": {"get": {
        "summary": "Jobs waiting for a reviewer's decision, oldest first (reviewer, operator)",
        "parameters": _PAGE_PARAMS,
        "responses": {"200": _page("jobs", _ref["JobDetail"], "the queue"), **_errors("400", "401", "403")}}},
    "/v1/reviews/{job_id}": {"post": {
        "summary": "Approve (release) or reject (withhold) a flagged job, with a reason (reviewer)",
        "parameters": [_id_param("job_id")],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ReviewRequest"}}}},
        "responses": {"200": _json(_ref["JobDetail"], "decided"), **_errors("400", "401", "403", "404", "409")}}},
    "/v1/base-models": {
        "post": {"summary": "Register a local diffusers folder or single-file checkpoint as a base model and "
                           "audit its baseline (operator)",
                 "requestBody": {"required": True, "content": {"application/json": {
                     "schema": {"$ref": "#/components/schemas/BaseModelRequest"}}}},
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
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/AlignmentRequest"}}}},
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

# Every operation but these is rate-limited per key (gate.api.ratelimit), so any may answer 429.
RATE_EXEMPT = ("/healthz", "/metrics")
for _path, _operations in PATHS.items():
    for _operation in _operations.values() if _path not in RATE_EXEMPT else ():
        _operation["responses"].setdefault("429", _ERRORS["429"])


def openapi_document() -> dict:
    return {"openapi": "3.1.0",
            "info": {"title": "ftgate", "version": "1",
                     "description": "Fine-tuning-as-a-service safety gate for text-to-image models"},
            "security": [{"bearer": []}], "paths": PATHS,
            "components": {"schemas": SCHEMAS, "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer", "description": "ftg_<key id>_<secret>"}}}}
