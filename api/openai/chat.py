"""``/models``, ``/chat/completions`` and ``/completions``: text jobs, waited on or streamed.

A streamed response is OpenAI's server-sent chunks, built from the job's ``delta``
events (the same stream as ``/v1/jobs/<id>/events``), then a last chunk with the
``finish_reason``, a usage chunk when ``stream_options.include_usage`` asks for it, and
``data: [DONE]``. The counts are the worker's, from the model's tokenizer. A job that
fails mid-stream ends the stream with an ``error`` chunk, which the SDKs raise.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Response, stream_with_context

from ..guards import json_body
from . import bp
from .bodies import chat_request, chat_response, completion_request, completion_response, unix, usage_of
from .waiting import cancel, entry_of, failure, follow, load, services, submit, take_slot, wait


@bp.get("/models")
def list_models():
    """The catalog's models (every kind), as OpenAI lists models."""
    return {"object": "list", "data": [_model(e) for e in services().catalog]}


@bp.get("/models/<model_id>")
def get_model(model_id: str):
    return _model(entry_of(model_id))


def _model(entry) -> dict[str, Any]:
    return {"id": entry.id, "object": "model", "created": 0, "owned_by": "vramq", "kind": entry.kind}


@bp.post("/chat/completions")
def chat_completions():
    model, inp, stream, include_usage = chat_request(json_body())
    return _run(model, inp, "/chat/completions", stream, include_usage, chat=True)


@bp.post("/completions")
def completions():
    model, inp, stream, include_usage = completion_request(json_body())
    return _run(model, inp, "/completions", stream, include_usage, chat=False)


def _run(model: str, inp: dict[str, Any], endpoint: str, stream: bool, include_usage: bool, *, chat: bool):
    entry_of(model, "text", endpoint)
    if not stream:
        job = submit(model, inp)
        _row, data = wait(job.id)
        if data["status"] != "succeeded":
            raise failure(data)
        return chat_response(data) if chat else completion_response(data)
    release = take_slot()  # before the job: a caller past its caps queues nothing
    try:
        job = submit(model, inp)
    except BaseException:
        release()
        raise
    resp = Response(
        stream_with_context(_chunks(job.id, job.model, unix(job.created_at.isoformat()), include_usage, chat)),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    resp.call_on_close(release)
    return resp


def _chunks(job_id: str, model: str, created: int, include_usage: bool, chat: bool):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {"id": job_id, "object": obj, "created": created, "model": model, "choices": choices, **extra}
        if chat:
            body["system_fingerprint"] = None
        return f"data: {json.dumps(body)}\n\n"

    def choice(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if role:
            delta["role"] = "assistant"
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    finished = False
    try:
        if chat:
            yield chunk([choice("", None, role=True)])
        try:
            for event, data in follow(job_id, services().settings.stream_s):
                if event == "delta":
                    yield chunk([choice(data["text"], None)])
                elif event == "idle":
                    yield ": keep-alive\n\n"  # a client that hung up is noticed here
        except Exception as exc:  # the wait ran out (ServiceUnavailable); the job was canceled
            finished = True
            yield _error_chunk(str(exc), "service_unavailable")
            return
        finished = True
        _row, job = load(job_id)
        if job["status"] != "succeeded":
            error = failure(job)
            yield _error_chunk(str(error), error.code)
            return
        yield chunk([choice(None if chat else "", job["output"].get("finish_reason") or "stop")])
        if include_usage:
            yield chunk([], usage=usage_of(job))
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client closed the stream before the job ended
            cancel(job_id)


def _error_chunk(message: str, code: str) -> str:
    return (
        "data: "
        + json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}})
        + "\n\n"
    )
