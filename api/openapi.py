"""The OpenAPI 3.1 document of what this server serves, with each model's input schema."""

from __future__ import annotations

import copy
import re
from typing import Any

from vramq.api.openai import PREFIX as OPENAI_PREFIX
from vramq.api.openai.document import ERROR_SCHEMA as OPENAI_ERROR
from vramq.api.openai.document import paths as openai_paths
from vramq.api.queries import KINDS
from vramq.api.ratelimit import EXEMPT_PREFIXES
from vramq.api.web_page import ASSETS as WEB_ASSETS
from vramq.jobs.batches.parsing import MAX_JOBS, BatchLine, BatchRequest
from vramq.jobs.lifecycle import CANCELED, FAILED, QUEUED, RUNNING, SUCCEEDED
from vramq.jobs.submit import WHISPER_LANGUAGES, JobRequest
from vramq.jobs.webhooks.spec import WebhookSpec

#: The statuses of a job and of a batch, as the API shows them.
JOB_STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)
BATCH_STATUSES = ("queued", "running", "completed", "canceled")
#: Paths the before-request checks skip entirely (probes): no Host, caller or body checks.
PROBES = ("/healthz", "/readyz", "/metrics")
REF = "#/components/schemas/{model}"

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


def _hoist(schema: dict, into: dict) -> dict:
    """A pydantic schema whose ``$defs`` go to the components (so its refs resolve in the
    document)."""
    for name, sub in schema.pop("$defs", {}).items():
        into[name] = sub
    return schema


def _csv_enum(values) -> dict:
    """A comma-separated list of ``values`` (``?status=a,b``)."""
    one = "|".join(re.escape(v) for v in values)
    return {"type": "string", "pattern": f"^({one})(,({one}))*$"}


def input_schema(entry, defs: dict) -> dict:
    """The JSON schema of a job's ``input`` for ``entry``: pydantic's schema of the
    entry's input model (its limits as bounds, its defaults), plus the rules pydantic
    checks in code (prompt xor messages, the frame step, non-empty stop strings,
    Whisper language codes, audio references)."""
    schema = _hoist(entry.input_model.model_json_schema(ref_template=REF), defs)
    props = schema["properties"]
    lim = entry.limit
    if entry.kind == "video" and lim.frame_step > 1:
        props["num_frames"]["enum"] = list(range(1, lim.max_frames + 1, lim.frame_step))
        props["num_frames"]["description"] = f"{lim.frame_step}k+1 (limit frame_step)"
    if entry.kind == "text":
        for alt in props["stop"]["anyOf"]:
            if alt.get("type") == "array":
                alt["items"] = {"type": "string", "minLength": 1}
        schema["oneOf"] = [
            {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
            {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
        ]
        schema["description"] = "exactly one of prompt or messages"
    if entry.kind == "speech":
        props["audio"]["pattern"] = "^(file_|data:audio/[^;,]+;base64,)"
        props["audio"]["description"] = "a file_… id (POST /v1/files, purpose audio) or a data:audio/…;base64 URI"
        for alt in props["language"]["anyOf"]:
            if alt.get("type") == "string":
                alt["enum"] = sorted(WHISPER_LANGUAGES)
    return schema


def _with_webhook(schema: dict) -> dict:
    """``schema``'s free-form ``webhook`` as the WebhookSpec it is checked against."""
    schema["properties"]["webhook"] = {
        "anyOf": [{"$ref": REF.format(model="WebhookSpec")}, {"type": "null"}],
        "default": None,
        "description": "needs an API key; the URL must be one the operator allows (VRAMQ_WEBHOOK_ALLOW_HOSTS)",
    }
    return schema


def _per_model(base: dict, catalog, name: str, schemas: dict) -> dict:
    """``base`` (a pydantic object schema with ``model`` and ``input``) as a ``oneOf`` over
    the catalog's models, discriminated by ``model``, each with its own input schema."""
    refs, mapping = [], {}
    for e in catalog:
        variant = copy.deepcopy(base)
        variant.pop("description", None)
        variant["title"] = f"{name}_{e.id}"
        variant["properties"]["model"] = {"type": "string", "const": e.id}
        variant["properties"]["input"] = {"$ref": REF.format(model=f"Input_{e.id}")}
        schemas[f"{name}_{e.id}"] = variant
        refs.append({"$ref": REF.format(model=f"{name}_{e.id}")})
        mapping[e.id] = REF.format(model=f"{name}_{e.id}")
    return {"oneOf": refs, "discriminator": {"propertyName": "model", "mapping": mapping}}


def _complete(paths: dict) -> None:
    """The answers every route can give, by what it passes (api.app's before-request
    checks): 400 for a Host not answered, 401 for a wrong API key, 422 for a NUL in the
    path, query or a checked header, 429 where the rate limiter counts, and 413/415 where
    a body is read."""
    problem = _problems(400, 401, 413, 415, 422, 429)
    for path, ops in paths.items():
        if path.startswith(OPENAI_PREFIX):  # errors in OpenAI's shape, listed by api.openai.document
            continue
        for op in ops.values():
            codes = []
            if not path.startswith(PROBES):
                codes += ["400", "401"]
                if op.get("parameters") or "{" in path:
                    codes.append("422")
                if not path.startswith(EXEMPT_PREFIXES):
                    codes.append("429")
                if "requestBody" in op:
                    codes += ["413", "415", "422"]
            for code in codes:
                op["responses"].setdefault(code, problem[code])


def spec(services) -> dict:
    defs: dict = {}
    inputs = {f"Input_{e.id}": input_schema(e, defs) for e in services.catalog}
    variants: dict = {}
    model_ids = [e.id for e in services.catalog]
    defs["WebhookSpec"] = _hoist(WebhookSpec.model_json_schema(ref_template=REF), defs)
    job_request = _per_model(
        _with_webhook(_hoist(JobRequest.model_json_schema(ref_template=REF), defs)),
        services.catalog,
        "JobRequest",
        variants,
    )
    batch_line = _per_model(
        _hoist(BatchLine.model_json_schema(ref_template=REF), defs), services.catalog, "BatchLine", variants
    )
    batch_request = _with_webhook(_hoist(BatchRequest.model_json_schema(ref_template=REF), defs))
    for alt in batch_request["properties"]["jobs"].get("anyOf", ()):
        if alt.get("type") == "array":
            alt["items"] = {"$ref": REF.format(model="BatchLine")}
    for alt in batch_request["properties"]["input_file"].get("anyOf", ()):
        if alt.get("type") == "string":
            alt["pattern"] = "^file_"
    batch_request["oneOf"] = [  # jobs xor input_file (jobs.batches.parsing.parse_request)
        {"required": ["jobs"], "properties": {"jobs": {"type": "array"}}},
        {"required": ["input_file"], "properties": {"input_file": {"type": "string"}}},
    ]
    job_ref = {"$ref": "#/components/schemas/Job"}
    batch_ref = {"$ref": "#/components/schemas/Batch"}
    model_enum = {"type": "string", "enum": model_ids}
    statuses = _csv_enum(JOB_STATUSES)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "vramq", "version": "1", "description": "Asynchronous batch job queue for GPU generation."},
        "paths": {
            "/v1/jobs": {
                "post": {
                    "summary": "Submit a job",
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 255}}
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}},
                    },
                    "responses": {
                        "202": _resp("accepted", job_ref),
                        "200": _resp("replayed (same Idempotency-Key and body)", job_ref),
                        **_problems(400, 401, 402, 409, 413, 415, 422, 429, 503),
                    },
                },
                "get": {
                    "summary": "The caller's jobs, newest first (needs an API key); cursor pagination stable under new jobs",
                    "parameters": [
                        _query("status", statuses, "one or more statuses, comma-separated"),
                        _query("model", model_enum),
                        _query("kind", {"enum": list(KINDS)}, "only jobs of models of this kind"),
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}),
                        _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
                    ],
                    "responses": {"200": _resp("a page: {data: [job], next_cursor}"), **_problems(401, 422)},
                },
            },
            "/v1/estimate": {
                "post": {
                    "summary": "What a job would reserve, without submitting it (the body of POST /v1/jobs)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}},
                    },
                    "responses": {
                        "200": _resp(
                            "{tokens, units, tokens_per_gpu_second, min_tokens, tokens_left, enough}",
                            {
                                "type": "object",
                                "required": ["tokens", "tokens_left", "enough"],
                                "properties": {
                                    "tokens": {"type": "integer"},
                                    "tokens_left": {"type": "integer"},
                                    "enough": {"type": "boolean"},
                                },
                            },
                        ),
                        **_problems(400, 422),
                    },
                }
            },
            "/": {
                "get": {
                    "summary": "The web page: generate, follow, download and share jobs in a browser",
                    "responses": {"200": _resp("the page", {"type": "string"}, "text/html")},
                }
            },
            "/web/{name}": {
                "get": {
                    "summary": "The web page's script, style sheet and icon",
                    "parameters": [
                        {"name": "name", "in": "path", "required": True, "schema": {"enum": sorted(WEB_ASSETS)}}
                    ],
                    "responses": {
                        "200": {
                            "description": "the file",
                            "content": {t.split(";")[0]: {"schema": {"type": "string"}} for t in WEB_ASSETS.values()},
                        },
                        **_problems(404),
                    },
                }
            },
            "/v1/jobs/{job_id}/save": {
                "post": {
                    "summary": "Keep the outputs past retention (needs an API key)",
                    "parameters": [JOB_ID],
                    "responses": {"200": _resp("saved", job_ref), **_problems(401, 404, 409)},
                },
                "delete": {
                    "summary": "Let the outputs expire again",
                    "parameters": [JOB_ID],
                    "responses": {"200": _resp("unsaved", job_ref), **_problems(401, 404, 409)},
                },
            },
            "/v1/jobs/{job_id}/share": {
                "post": {
                    "summary": "A public read-only link to the job (/s/<token>), the same until revoked",
                    "parameters": [JOB_ID],
                    "responses": {"200": _resp("{url, token}"), **_problems(404)},
                },
                "delete": {
                    "summary": "Revoke the job's share link",
                    "parameters": [JOB_ID],
                    "responses": {"200": _resp("{revoked}"), **_problems(404)},
                },
            },
            "/v1/jobs/{job_id}/deliveries": {
                "get": {
                    "summary": "The job's webhook deliveries, each with every attempt",
                    "parameters": [JOB_ID],
                    "responses": {"200": _resp("{data: [delivery]}"), **_problems(404)},
                }
            },
            "/v1/webhooks/secret": {
                "get": {
                    "summary": "The account's Standard Webhooks signing secret (whsec_…)",
                    "responses": {"200": _resp("{secret}"), **_problems(401, 403)},
                }
            },
            "/v1/batches": {
                "post": {
                    "summary": f"Submit up to {MAX_JOBS} jobs as one batch (jobs, or a JSONL input_file): all or none; "
                    "priority defaults to low",
                    "parameters": [IDEMPOTENCY],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}}},
                    },
                    "responses": {
                        "202": _resp("accepted", batch_ref),
                        "200": _resp("replayed (same Idempotency-Key and body)", batch_ref),
                        **_problems(400, 401, 402, 409, 413, 415, 422, 429, 503),
                    },
                },
                "get": {
                    "summary": "The caller's batches, newest first (needs an API key)",
                    "parameters": [
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}),
                        _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
                    ],
                    "responses": {"200": _resp("a page: {data: [batch], next_cursor}"), **_problems(401, 422)},
                },
            },
            "/v1/batches/{batch_id}": {
                "get": {
                    "summary": "Read a batch: counts by status, usage, results_url once finished",
                    "parameters": [BATCH_ID],
                    "responses": {"200": _resp("the batch", batch_ref), **_problems(404)},
                }
            },
            "/v1/batches/{batch_id}/jobs": {
                "get": {
                    "summary": "The batch's jobs in submission order",
                    "parameters": [
                        BATCH_ID,
                        _query("status", statuses, "one or more statuses, comma-separated"),
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
                        _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
                    ],
                    "responses": {"200": _resp("a page: {data: [job], next_cursor}"), **_problems(404, 422)},
                }
            },
            "/v1/batches/{batch_id}/cancel": {
                "post": {
                    "summary": "Cancel the batch's queued and running jobs (queued ones are refunded)",
                    "parameters": [BATCH_ID],
                    "responses": {
                        "200": _resp("the batch, with canceled: {queued, running}", batch_ref),
                        **_problems(404, 409),
                    },
                }
            },
            "/v1/batches/{batch_id}/events": {
                "get": {
                    "summary": "Server-sent events: counts whenever they change, then done with results_url",
                    "parameters": [BATCH_ID],
                    "responses": {
                        "200": _resp("event stream", {"type": "string"}, "text/event-stream"),
                        **_problems(404),
                    },
                }
            },
            "/v1/batches/{batch_id}/deliveries": {
                "get": {
                    "summary": "The batch's own webhook deliveries (batch.completed), each with every attempt",
                    "parameters": [BATCH_ID],
                    "responses": {"200": _resp("{data: [delivery]}"), **_problems(404)},
                }
            },
            "/s/{token}": {
                "get": {
                    "summary": "A shared job's result, no key needed; a browser (HTML preferred) gets the web page",
                    "parameters": [{"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": {
                            "description": "the shared job (JSON), or the page that shows it (HTML)",
                            "content": {"application/json": {}, "text/html": {"schema": {"type": "string"}}},
                        },
                        **_problems(404),
                    },
                }
            },
            "/v1/accounts": {
                "post": {
                    "summary": "Make a free account; the API key is shown in this answer only",
                    "requestBody": {
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"name": {"type": "string", "maxLength": 120}},
                                }
                            }
                        }
                    },
                    "responses": {
                        "201": _resp("{account_id, api_key, key_prefix, tier, name, created_at}"),
                        **_problems(413, 415, 422, 429, 503),
                    },
                }
            },
            "/v1/account": {
                "get": {"summary": "The calling account", "responses": {"200": _resp("the account"), **_problems(401)}}
            },
            "/v1/usage": {
                "get": {
                    "summary": "Tokens: tier, daily_allowance, used_today, balance, available, resets_at",
                    "responses": {"200": _resp("usage"), **_problems(401)},
                }
            },
            "/v1/admin/jobs": {
                "get": {
                    "summary": "Every caller's jobs, newest first (admin key); status=failed&code=worker_lost is the "
                    "dead-letter view",
                    "parameters": [
                        _query("status", statuses, "one or more statuses, comma-separated"),
                        _query("code", {"type": "string"}, "error code, e.g. worker_lost, model_load_failed"),
                        _query(
                            "caller",
                            {"type": "string"},
                            "the owner (acct_…, or anon:NETWORK: an IPv4 address or an IPv6 /64)",
                        ),
                        _query("model", model_enum),
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}),
                        _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
                    ],
                    "responses": {"200": _resp("a page: {data: [job], next_cursor}"), **_problems(401, 403, 422)},
                }
            },
            "/v1/admin/accounts/{account_id}": {
                "get": {
                    "summary": "An account with its usage and latest ledger entries (admin key)",
                    "parameters": [
                        ACCOUNT_ID,
                        _query(
                            "limit",
                            {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                            "ledger entries shown, newest first",
                        ),
                    ],
                    "responses": {"200": _resp("account"), **_problems(401, 403, 404, 422)},
                }
            },
            "/v1/admin/accounts/{account_id}/credit": {
                "post": {
                    "summary": "Add purchased tokens (a pack) to an account's balance (admin key)",
                    "parameters": [ACCOUNT_ID, IDEMPOTENCY],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["tokens"],
                                    "properties": {
                                        "tokens": {"type": "integer", "minimum": 1, "maximum": 1_000_000_000},
                                        "reason": {"type": "string", "maxLength": 200},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "201": _resp("{account_id, balance}"),
                        "200": _resp("replayed (same Idempotency-Key)"),
                        **_problems(401, 403, 404, 409, 413, 415, 422),
                    },
                }
            },
            "/v1/jobs/{job_id}": {
                "get": {
                    "summary": "Read a job",
                    "parameters": [JOB_ID],
                    "responses": {"200": _resp("the job", job_ref), **_problems(404)},
                }
            },
            "/v1/jobs/{job_id}/cancel": {
                "post": {
                    "summary": "Cancel a queued or running job",
                    "parameters": [JOB_ID],
                    "responses": {"200": _resp("canceled", job_ref), **_problems(404, 409)},
                }
            },
            "/v1/jobs/{job_id}/events": {
                "get": {
                    "summary": "Server-sent events: status, progress, delta (text), done; resumes after Last-Event-ID",
                    "parameters": [JOB_ID, {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}}],
                    "responses": {
                        "200": _resp("event stream", {"type": "string"}, "text/event-stream"),
                        **_problems(404, 422),
                    },
                }
            },
            "/v1/files": {
                "post": {
                    "summary": "Upload a file (audio for speech jobs, JSONL for batches); content is checked by decoding",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["file", "purpose"],
                                    "properties": {
                                        "file": {"type": "string", "format": "binary"},
                                        "purpose": {"enum": ["audio", "batch"]},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {"201": _resp("the stored file"), **_problems(413, 415, 422)},
                }
            },
            "/v1/files/{file_id}": {
                "get": {
                    "summary": "A file's record",
                    "parameters": [{"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": _resp("the file"), **_problems(404)},
                }
            },
            "/v1/workers": {
                "get": {
                    "summary": "Live workers (from heartbeats): card, models, state",
                    "responses": {"200": _resp("workers")},
                }
            },
            "/v1/models": {"get": {"summary": "The model catalog", "responses": {"200": _resp("models")}}},
            "/v1/models/{model_id}": {
                "get": {
                    "summary": "One model",
                    "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": _resp("model"), **_problems(404)},
                }
            },
            "/v1/blobs/{key}": {
                "get": {
                    "summary": "Download an object of the local store through a signed link",
                    "parameters": [
                        {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}},
                        {"name": "expires", "in": "query", "required": True, "schema": {"type": "integer"}},
                        {"name": "sig", "in": "query", "required": True, "schema": {"type": "string"}},
                    ],
                    "responses": {"200": _resp("the object"), **_problems(403, 404)},
                }
            },
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _resp("OpenAPI 3.1")}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _resp("alive")}}},
            "/readyz": {
                "get": {
                    "summary": "Readiness: database, broker and storage reachable",
                    "responses": {"200": _resp("ready"), "503": _resp("not ready")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": _resp("metrics", {"type": "string"}, "text/plain")},
                }
            },
        },
        "components": {
            "schemas": {
                "JobRequest": {**job_request, "description": "one of the catalog's models, with that model's input"},
                "Job": {
                    "type": "object",
                    "required": ["id", "object", "model", "status"],
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "job"},
                        "model": {"type": "string"},
                        "status": {"enum": list(JOB_STATUSES)},
                        "progress": {"type": "number"},
                        "queue_position": {"type": ["integer", "null"]},
                        "eta_seconds": {
                            "type": ["number", "null"],
                            "description": "while queued: (position + 1) / the model's recent jobs per second",
                        },
                        "output": {"type": ["object", "null"]},
                        "error": {"type": ["object", "null"]},
                        "usage": {"type": "object"},
                    },
                },
                "BatchRequest": {**batch_request, "description": "each of jobs is a BatchLine"},
                "BatchLine": {
                    **batch_line,
                    "description": "one job of a batch: one of the catalog's models, with its input",
                },
                "Batch": {
                    "type": "object",
                    "required": ["id", "object", "status", "counts"],
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "batch"},
                        "status": {"enum": list(BATCH_STATUSES)},
                        "counts": {
                            "type": "object",
                            "properties": {
                                k: {"type": "integer"}
                                for k in ("total", "queued", "running", "succeeded", "failed", "canceled")
                            },
                        },
                        "results_url": {
                            "type": ["string", "null"],
                            "description": "signed link to the JSONL manifest, once finished",
                        },
                        "usage": {"type": "object"},
                    },
                },
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail", "code"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "code": {"type": "string"},
                        "errors": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"loc": {"type": "array"}, "msg": {"type": "string"}},
                            },
                        },
                    },
                },
                **inputs,
                **variants,
                **defs,
            },
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an account's API key (vq_…), or the admin key",
                }
            },
        },
        "security": [{}, {"apiKey": []}],
    }
    doc["paths"].update(openai_paths(model_ids))
    doc["components"]["schemas"]["OpenAIError"] = OPENAI_ERROR
    _complete(doc["paths"])
    return doc
