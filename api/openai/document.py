"""The ``/openai/v1`` routes in ``/openapi.json``: what each takes and answers. Errors
here are OpenAI's ``{"error": {…}}`` as ``application/json``, not problem+json."""

from __future__ import annotations

from typing import Any

from . import PREFIX

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
#: Every route can answer these (api.app's checks before any view: Host, key, rate limit, NUL).
ALWAYS = (400, 401, 429)
#: And these where a body is read.
WITH_BODY = (413,)


def _error() -> dict[str, Any]:
    return {
        "description": "error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}},
    }


def _op(
    summary: str,
    ok: dict[str, Any],
    codes: tuple[int, ...] = (),
    body: dict[str, Any] | None = None,
    path_param: str | None = None,
    query: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": ["openai"], "responses": {"200": ok}}
    params = list(query or [])
    if path_param:
        params.append({"name": path_param, "in": "path", "required": True, "schema": {"type": "string"}})
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    for code in sorted(set(ALWAYS + codes + (WITH_BODY if body is not None else ()))):
        op["responses"][str(code)] = _error()
    return op


def _json(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}


def _body(required: list[str], props: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": {"type": "object", "required": required, "properties": props}}}


def _multipart(required: list[str], props: dict[str, Any]) -> dict[str, Any]:
    return {"multipart/form-data": {"schema": {"type": "object", "required": required, "properties": props}}}


SAMPLING = {
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "seed": {"type": "integer", "minimum": 0},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "n": {"const": 1},
    "stream": {"type": "boolean"},
}
MESSAGES = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {"role": {"enum": ["system", "developer", "user", "assistant"]}, "content": {"type": "string"}},
    },
}


def paths(model_ids: list[str]) -> dict[str, Any]:
    model = {"type": "string", "enum": model_ids}
    streamed = {
        "description": "the completion, or with stream: true server-sent chunks ending in data: [DONE]",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }
    speech = _multipart(
        ["file", "model"],
        {
            "file": {"type": "string", "format": "binary"},
            "model": model,
            "language": {"type": "string"},
            "response_format": {"enum": ["json", "text", "srt", "vtt", "verbose_json"]},
        },
    )
    transcript = {
        "description": "the transcript (json, verbose_json) or text (text, srt, vtt)",
        "content": {"application/json": {"schema": {"type": "object"}}, "text/plain": {"schema": {"type": "string"}}},
    }
    sync = (404, 503)
    p = PREFIX
    return {
        f"{p}/models": {"get": _op("OpenAI: the catalog's models", _json("a list of models"))},
        f"{p}/models/{{model_id}}": {"get": _op("OpenAI: one model", _json("model"), (404,), path_param="model_id")},
        f"{p}/chat/completions": {
            "post": _op(
                "OpenAI: a chat completion (a text job, waited on or streamed)",
                streamed,
                sync,
                _body(["model", "messages"], {"model": model, "messages": MESSAGES, **SAMPLING}),
            )
        },
        f"{p}/completions": {
            "post": _op(
                "OpenAI: a completion (a text job, waited on or streamed)",
                streamed,
                sync,
                _body(["model", "prompt"], {"model": model, "prompt": {"type": "string"}, **SAMPLING}),
            )
        },
        f"{p}/images/generations": {
            "post": _op(
                "OpenAI: images (an image job, waited on)",
                _json("the images"),
                sync,
                _body(
                    ["model", "prompt"],
                    {
                        "model": model,
                        "prompt": {"type": "string"},
                        "n": {"type": "integer", "minimum": 1},
                        "size": {"type": "string", "pattern": "^[0-9]+x[0-9]+$"},
                        "response_format": {"enum": ["url", "b64_json"]},
                        "seed": {"type": "integer", "minimum": 0},
                    },
                ),
            )
        },
        f"{p}/audio/transcriptions": {
            "post": _op("OpenAI: a transcription (a speech job, waited on)", transcript, sync, speech)
        },
        f"{p}/audio/translations": {
            "post": _op("OpenAI: a translation to English (a speech job, waited on)", transcript, sync, speech)
        },
        f"{p}/files": {
            "post": _op(
                "OpenAI: upload a batch input file (JSONL)",
                _json("the file"),
                (),
                _multipart(
                    ["file", "purpose"], {"file": {"type": "string", "format": "binary"}, "purpose": {"const": "batch"}}
                ),
            )
        },
        f"{p}/files/{{file_id}}": {
            "get": _op("OpenAI: a file", _json("the file"), (404,), path_param="file_id"),
            "delete": _op("OpenAI: delete a file", _json("deleted"), (404,), path_param="file_id"),
        },
        f"{p}/files/{{file_id}}/content": {
            "get": _op(
                "OpenAI: a file's content",
                {"description": "JSONL", "content": {"application/jsonl": {"schema": {"type": "string"}}}},
                (404, 503),
                path_param="file_id",
            )
        },
        f"{p}/batches": {
            "post": _op(
                "OpenAI: a batch over an uploaded file (a vramq batch)",
                _json("the batch"),
                (404, 409, 503),
                _body(
                    ["input_file_id", "endpoint", "completion_window"],
                    {
                        "input_file_id": {"type": "string"},
                        "endpoint": {"enum": ["/v1/chat/completions", "/v1/completions", "/v1/images/generations"]},
                        "completion_window": {"const": "24h"},
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 16},
                    },
                ),
            ),
            "get": _op(
                "OpenAI: the caller's batches, newest first (needs an API key)",
                _json("a page of batches"),
                (),
                query=[
                    {"name": "after", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                ],
            ),
        },
        f"{p}/batches/{{batch_id}}": {
            "get": _op("OpenAI: a batch", _json("the batch"), (404, 503), path_param="batch_id")
        },
        f"{p}/batches/{{batch_id}}/cancel": {
            "post": _op("OpenAI: cancel a batch", _json("the batch"), (404, 409, 503), path_param="batch_id")
        },
    }
