"""The OpenAPI 3.1 document of what this server serves, with each model's input schema."""

from __future__ import annotations

from jobs.batches import MAX_JOBS, BatchLine, BatchRequest
from jobs.submit import JobRequest

PROBLEM = {"$ref": "#/components/schemas/Problem"}


def _resp(description: str, schema: dict | None = None, media: str = "application/json") -> dict:
    out: dict = {"description": description}
    if schema is not None:
        out["content"] = {media: {"schema": schema}}
    return out


def _problems(*codes: int) -> dict:
    return {str(c): _resp("problem", PROBLEM, "application/problem+json") for c in codes}


JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^job_"}}
ACCOUNT_ID = {"name": "account_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^acct_"}}
BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^batch_"}}
IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 255}}


def _query(name: str, schema: dict, description: str = "") -> dict:
    return {"name": name, "in": "query", "schema": schema, "description": description}


def spec(services) -> dict:
    inputs = {f"Input_{e.id}": e.input_model.model_json_schema() for e in services.catalog}
    job_ref = {"$ref": "#/components/schemas/Job"}
    batch_ref = {"$ref": "#/components/schemas/Batch"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "vramq", "version": "1", "description": "Asynchronous batch job queue for GPU generation."},
        "paths": {
            "/v1/jobs": {
                "post": {
                    "summary": "Submit a job",
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 255}}],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}}},
                    "responses": {"202": _resp("accepted", job_ref), "200": _resp("replayed (same Idempotency-Key and body)", job_ref),
                                  **_problems(400, 401, 402, 409, 413, 415, 422, 429, 503)},
                },
                "get": {"summary": "The caller's jobs, newest first (needs an API key); cursor pagination stable under new jobs",
                        "parameters": [_query("status", {"type": "string"}, "one or more statuses, comma-separated"),
                                       _query("model", {"type": "string"}),
                                       _query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}),
                                       _query("cursor", {"type": "string"}, "next_cursor of the previous page")],
                        "responses": {"200": _resp("a page: {data: [job], next_cursor}"), **_problems(401, 422)}},
            },
            "/v1/jobs/{job_id}/save": {
                "post": {"summary": "Keep the outputs past retention (needs an API key)", "parameters": [JOB_ID],
                         "responses": {"200": _resp("saved", job_ref), **_problems(401, 404, 409)}},
                "delete": {"summary": "Let the outputs expire again", "parameters": [JOB_ID],
                           "responses": {"200": _resp("unsaved", job_ref), **_problems(401, 404, 409)}},
            },
            "/v1/jobs/{job_id}/share": {
                "post": {"summary": "A public read-only link to the job (/s/<token>), the same until revoked", "parameters": [JOB_ID],
                         "responses": {"200": _resp("{url, token}"), **_problems(404)}},
                "delete": {"summary": "Revoke the job's share link", "parameters": [JOB_ID],
                           "responses": {"200": _resp("{revoked}"), **_problems(404)}},
            },
            "/v1/jobs/{job_id}/deliveries": {"get": {
                "summary": "The job's webhook deliveries, each with every attempt", "parameters": [JOB_ID],
                "responses": {"200": _resp("{data: [delivery]}"), **_problems(404)}}},
            "/v1/webhooks/secret": {"get": {
                "summary": "The account's Standard Webhooks signing secret (whsec_…)",
                "responses": {"200": _resp("{secret}"), **_problems(401, 403)}}},
            "/v1/batches": {
                "post": {
                    "summary": f"Submit up to {MAX_JOBS} jobs as one batch (jobs, or a JSONL input_file): all or none; "
                               "priority defaults to low",
                    "parameters": [IDEMPOTENCY],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}}}},
                    "responses": {"202": _resp("accepted", batch_ref), "200": _resp("replayed (same Idempotency-Key and body)", batch_ref),
                                  **_problems(400, 401, 402, 409, 413, 415, 422, 429, 503)},
                },
                "get": {"summary": "The caller's batches, newest first (needs an API key)",
                        "parameters": [_query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}),
                                       _query("cursor", {"type": "string"}, "next_cursor of the previous page")],
                        "responses": {"200": _resp("a page: {data: [batch], next_cursor}"), **_problems(401, 422)}},
            },
            "/v1/batches/{batch_id}": {"get": {"summary": "Read a batch: counts by status, usage, results_url once finished",
                                               "parameters": [BATCH_ID], "responses": {"200": _resp("the batch", batch_ref), **_problems(404)}}},
            "/v1/batches/{batch_id}/jobs": {"get": {
                "summary": "The batch's jobs in submission order",
                "parameters": [BATCH_ID, _query("status", {"type": "string"}, "one or more statuses, comma-separated"),
                               _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
                               _query("cursor", {"type": "string"}, "next_cursor of the previous page")],
                "responses": {"200": _resp("a page: {data: [job], next_cursor}"), **_problems(404, 422)}}},
            "/v1/batches/{batch_id}/cancel": {"post": {
                "summary": "Cancel the batch's queued and running jobs (queued ones are refunded)", "parameters": [BATCH_ID],
                "responses": {"200": _resp("the batch, with canceled: {queued, running}", batch_ref), **_problems(404, 409)}}},
            "/v1/batches/{batch_id}/events": {"get": {
                "summary": "Server-sent events: counts whenever they change, then done with results_url",
                "parameters": [BATCH_ID],
                "responses": {"200": _resp("event stream", {"type": "string"}, "text/event-stream"), **_problems(404)}}},
            "/v1/batches/{batch_id}/deliveries": {"get": {
                "summary": "The batch's own webhook deliveries (batch.completed), each with every attempt", "parameters": [BATCH_ID],
                "responses": {"200": _resp("{data: [delivery]}"), **_problems(404)}}},
            "/s/{token}": {"get": {"summary": "A shared job's result, no key needed",
                                   "parameters": [{"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}],
                                   "responses": {"200": _resp("the shared job"), **_problems(404)}}},
            "/v1/accounts": {"post": {"summary": "Make a free account; the API key is shown in this answer only",
                                      "requestBody": {"content": {"application/json": {"schema": {
                                          "type": "object", "properties": {"name": {"type": "string", "maxLength": 120}}}}}},
                                      "responses": {"201": _resp("{account_id, api_key, key_prefix, tier, name, created_at}"),
                                                    **_problems(413, 415, 422, 429, 503)}}},
            "/v1/account": {"get": {"summary": "The calling account", "responses": {"200": _resp("the account"), **_problems(401)}}},
            "/v1/usage": {"get": {"summary": "Tokens: tier, daily_allowance, used_today, balance, available, resets_at",
                                  "responses": {"200": _resp("usage"), **_problems(401)}}},
            "/v1/admin/jobs": {"get": {
                "summary": "Every caller's jobs, newest first (admin key); status=failed&code=worker_lost is the "
                           "dead-letter view",
                "parameters": [_query("status", {"type": "string"}, "one or more statuses, comma-separated"),
                               _query("code", {"type": "string"}, "error code, e.g. worker_lost, model_load_failed"),
                               _query("caller", {"type": "string"}, "the owner (acct_…, or anon:NETWORK: an IPv4 address or an IPv6 /64)"),
                               _query("model", {"type": "string"}),
                               _query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}),
                               _query("cursor", {"type": "string"}, "next_cursor of the previous page")],
                "responses": {"200": _resp("a page: {data: [job], next_cursor}"), **_problems(401, 403, 422)}}},
            "/v1/admin/accounts/{account_id}": {"get": {
                "summary": "An account with its usage and latest ledger entries (admin key)",
                "parameters": [ACCOUNT_ID, _query("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                                                  "ledger entries shown, newest first")],
                "responses": {"200": _resp("account"), **_problems(401, 403, 404, 422)}}},
            "/v1/admin/accounts/{account_id}/credit": {"post": {
                "summary": "Add purchased tokens (a pack) to an account's balance (admin key)",
                "parameters": [ACCOUNT_ID, IDEMPOTENCY],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["tokens"],
                    "properties": {"tokens": {"type": "integer", "minimum": 1, "maximum": 1_000_000_000},
                                   "reason": {"type": "string", "maxLength": 200}}}}}},
                "responses": {"201": _resp("{account_id, balance}"), "200": _resp("replayed (same Idempotency-Key)"),
                              **_problems(401, 403, 404, 409, 413, 415, 422)}}},
            "/v1/jobs/{job_id}": {"get": {"summary": "Read a job", "parameters": [JOB_ID],
                                          "responses": {"200": _resp("the job", job_ref), **_problems(404)}}},
            "/v1/jobs/{job_id}/cancel": {"post": {"summary": "Cancel a queued or running job", "parameters": [JOB_ID],
                                                  "responses": {"200": _resp("canceled", job_ref), **_problems(404, 409)}}},
            "/v1/jobs/{job_id}/events": {"get": {"summary": "Server-sent events: status, progress, delta (text), done; resumes after Last-Event-ID",
                                                 "parameters": [JOB_ID, {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}}],
                                                 "responses": {"200": _resp("event stream", {"type": "string"}, "text/event-stream"), **_problems(404, 422)}}},
            "/v1/files": {"post": {
                "summary": "Upload a file (audio for speech jobs, JSONL for batches); content is checked by decoding",
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["file", "purpose"],
                    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"enum": ["audio", "batch"]}}}}}},
                "responses": {"201": _resp("the stored file"), **_problems(413, 415, 422)}}},
            "/v1/files/{file_id}": {"get": {"summary": "A file's record", "parameters": [{"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                                            "responses": {"200": _resp("the file"), **_problems(404)}}},
            "/v1/workers": {"get": {"summary": "Live workers (from heartbeats): card, models, state", "responses": {"200": _resp("workers")}}},
            "/v1/models": {"get": {"summary": "The model catalog", "responses": {"200": _resp("models")}}},
            "/v1/models/{model_id}": {"get": {"summary": "One model", "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                                              "responses": {"200": _resp("model"), **_problems(404)}}},
            "/v1/blobs/{key}": {"get": {"summary": "Download an object of the local store through a signed link",
                                        "parameters": [{"name": "key", "in": "path", "required": True, "schema": {"type": "string"}},
                                                       {"name": "expires", "in": "query", "required": True, "schema": {"type": "integer"}},
                                                       {"name": "sig", "in": "query", "required": True, "schema": {"type": "string"}}],
                                        "responses": {"200": _resp("the object"), **_problems(403, 404)}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _resp("OpenAPI 3.1")}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _resp("alive")}}},
            "/readyz": {"get": {"summary": "Readiness: database, broker and storage reachable",
                                "responses": {"200": _resp("ready"), "503": _resp("not ready")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": _resp("metrics", {"type": "string"}, "text/plain")}}},
        },
        "components": {
            "schemas": {
                "JobRequest": {**JobRequest.model_json_schema(), "description": "input is validated against the model's Input_<model> schema"},
                "Job": {"type": "object", "required": ["id", "object", "model", "status"], "properties": {
                    "id": {"type": "string"}, "object": {"const": "job"}, "model": {"type": "string"},
                    "status": {"enum": ["queued", "running", "succeeded", "failed", "canceled"]},
                    "progress": {"type": "number"}, "queue_position": {"type": ["integer", "null"]},
                    "eta_seconds": {"type": ["number", "null"], "description": "while queued: (position + 1) / the model's recent jobs per second"},
                    "output": {"type": ["object", "null"]}, "error": {"type": ["object", "null"]}, "usage": {"type": "object"},
                }},
                "BatchRequest": {**BatchRequest.model_json_schema(), "description": "each of jobs is a BatchLine"},
                "BatchLine": BatchLine.model_json_schema(),
                "Batch": {"type": "object", "required": ["id", "object", "status", "counts"], "properties": {
                    "id": {"type": "string"}, "object": {"const": "batch"},
                    "status": {"enum": ["queued", "running", "completed", "canceled"]},
                    "counts": {"type": "object", "properties": {k: {"type": "integer"} for k in (
                        "total", "queued", "running", "succeeded", "failed", "canceled")}},
                    "results_url": {"type": ["string", "null"], "description": "signed link to the JSONL manifest, once finished"},
                    "usage": {"type": "object"},
                }},
                "Problem": {"type": "object", "required": ["type", "title", "status", "detail", "code"], "properties": {
                    "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                    "detail": {"type": "string"}, "code": {"type": "string"},
                    "errors": {"type": "array", "items": {"type": "object", "properties": {"loc": {"type": "array"}, "msg": {"type": "string"}}}},
                }},
                **inputs,
            }
        },
    }
