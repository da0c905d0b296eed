"""The API's OpenAPI 3.1 description, written by hand and kept true by a test that every route is in it."""

from __future__ import annotations

from .jobs import HYPERPARAMETERS

_ref = {name: {"$ref": f"#/components/schemas/{name}"} for name in ("Dataset", "Job", "BaseModel", "Error")}
_ERRORS = {code: {"description": text, "content": {"application/json": {"schema": _ref["Error"]}}}
           for code, text in {"400": "invalid request", "401": "missing, invalid or revoked key",
                              "403": "role not allowed", "404": "not found (or another tenant's)",
                              "409": "conflict", "413": "too large", "415": "unsupported upload content",
                              "422": "refused by the contamination policy",
                              "503": "the contamination scanner failed"}.items()}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: str) -> dict:
    return {code: _ERRORS[code] for code in codes}


def _id_param(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_TIME = {"type": ["string", "null"], "format": "date-time"}
SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["status", "reason", "message"],
        "properties": {"status": {"type": "integer"}, "reason": {"type": "string"}, "message": {"type": "string"},
                       "field": {"type": "string"}, "files": {"type": "array", "items": {"type": "string"}}},
        "additionalProperties": True}}},
    "Dataset": {"type": "object", "properties": {
        "id": {"type": "string"}, "tenant": {"type": "string"}, "name": {"type": "string"},
        "status": {"enum": ["received", "accepted", "flagged", "rejected"]}, "content_sha256": {"type": "string"},
        "size_bytes": {"type": "integer"}, "image_count": {"type": ["integer", "null"]},
        "contamination_ratio": {"type": ["number", "null"]}, "created_at": _TIME,
        "flagged_files": {"type": "array", "items": {"type": "string"}}}},
    "Hyperparameters": {"type": "object", "additionalProperties": False,
                        "properties": {name: {"type": "number" if name == "learning_rate" else "integer"}
                                       for name in HYPERPARAMETERS}},
    "JobRequest": {"type": "object", "required": ["base_model", "dataset", "method"], "additionalProperties": False,
                   "properties": {"base_model": {"type": "string"}, "dataset": {"type": "string"},
                                  "method": {"enum": ["lora", "dreambooth"]},
                                  "hyperparameters": {"$ref": "#/components/schemas/Hyperparameters"},
                                  "idempotency_key": {"type": "string", "maxLength": 200}}},
    "Job": {"type": "object", "properties": {
        "id": {"type": "string"}, "tenant": {"type": "string"}, "base_model": {"type": "string"},
        "dataset": {"type": "string"}, "method": {"type": "string"},
        "hyperparameters": {"$ref": "#/components/schemas/Hyperparameters"},
        "status": {"enum": ["queued", "training", "auditing", "review", "released", "withheld", "failed",
                            "cancelled"]},
        "stage": {"type": ["string", "null"]}, "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "attempts": {"type": "integer"}, "idempotency_key": {"type": ["string", "null"]},
        "error": {"type": ["string", "null"]}, "created_at": _TIME, "updated_at": _TIME, "finished_at": _TIME}},
    "BaseModelRequest": {"type": "object", "required": ["name", "path"],
                         "properties": {"name": {"type": "string"}, "path": {"type": "string"}}},
    "BaseModel": {"type": "object", "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "path": {"type": "string"},
        "weights_sha256": {"type": "string"}, "created_at": _TIME}},
    "Health": {"type": "object", "properties": {"status": {"type": "string"}, "database": {"type": "string"}}},
}

PATHS = {
    "/v1/datasets": {"post": {
        "summary": "Upload a dataset zip (customer); it is checked, re-encoded and scanned before it is stored",
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "contentMediaType": "application/zip"},
                           "name": {"type": "string"}}}}}},
        "responses": {"201": _json(_ref["Dataset"], "accepted or flagged"),
                      **_errors("400", "401", "403", "413", "415", "422", "503")}}},
    "/v1/datasets/{dataset_id}": {"get": {
        "summary": "A dataset (tenant-scoped)", "parameters": [_id_param("dataset_id")],
        "responses": {"200": _json(_ref["Dataset"], "the dataset"), **_errors("401", "404")}}},
    "/v1/jobs": {
        "post": {"summary": "Queue a fine-tuning job (customer); same idempotency_key returns the existing job",
                 "requestBody": {"required": True, "content": {"application/json": {
                     "schema": {"$ref": "#/components/schemas/JobRequest"}}}},
                 "responses": {"201": _json(_ref["Job"], "queued"), "200": _json(_ref["Job"], "existing job"),
                               **_errors("400", "401", "403", "404", "409")}},
        "get": {"summary": "The caller's jobs (reviewers and operators: all tenants')",
                "responses": {"200": _json({"type": "object", "properties": {
                    "jobs": {"type": "array", "items": _ref["Job"]}}}, "jobs, newest first"),
                    **_errors("401")}}},
    "/v1/jobs/{job_id}": {"get": {
        "summary": "A job's status, stage and progress (tenant-scoped)", "parameters": [_id_param("job_id")],
        "responses": {"200": _json(_ref["Job"], "the job"), **_errors("401", "404")}}},
    "/v1/base-models": {"post": {
        "summary": "Register a local diffusers folder as a base model (operator)",
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/BaseModelRequest"}}}},
        "responses": {"201": _json(_ref["BaseModel"], "registered"), **_errors("400", "401", "403", "409")}}},
    "/healthz": {"get": {
        "summary": "Liveness and database reachability", "security": [],
        "responses": {"200": _json({"$ref": "#/components/schemas/Health"}, "healthy"),
                      "503": _json({"$ref": "#/components/schemas/Health"}, "database unreachable")}}},
    "/openapi.json": {"get": {"summary": "This document", "security": [],
                              "responses": {"200": {"description": "OpenAPI 3.1 document"}}}},
}


def openapi_document() -> dict:
    return {"openapi": "3.1.0",
            "info": {"title": "ftgate", "version": "1",
                     "description": "Fine-tuning-as-a-service safety gate for text-to-image models"},
            "security": [{"bearer": []}], "paths": PATHS,
            "components": {"schemas": SCHEMAS, "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer", "description": "ftg_<key id>_<secret>"}}}}
