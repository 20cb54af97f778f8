"""Submitting a job for a synchronous OpenAI call, and waiting on it.

A synchronous call holds one of the caller's stream slots (``api.streams``, 429 past its
caps) for as long as it waits: it holds a thread, like an event stream. It waits at most
``VRAMQ_STREAM_SECONDS``; a job not done by then is canceled and the call answers 503,
so no request hangs (the Batch API is the way to queue work for longer). A client that
hangs up while waiting cancels its job: a streamed response notices at its next write
(at least every second), a plain one within a second or so (its socket is looked at
between reads of the job's events).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

from flask import current_app, request

from vramq.jobs import events, outcomes
from vramq.jobs.errors import InputError, ServiceUnavailable
from vramq.jobs.lifecycle import TERMINAL
from vramq.jobs.schema import Job
from vramq.jobs.submit import submit_job

from ..callers import current_caller
from ..metrics import JOBS_SUBMITTED
from ..views import job_json

#: How long one read of a job's events blocks before the row is looked at again.
POLL_MS = 1000
#: A plain (not streamed) call looks at its client's socket at most this often.
GONE_CHECK_S = 0.5


def services():
    return current_app.config["VRAMQ"]


def bad(param: str, msg: str, code: str | None = None) -> InputError:
    """A 400 naming ``param`` (an InputError: 422 natively, 400 under /openai/v1)."""
    return InputError(f"{param}: {msg}", [{"loc": [param], "msg": msg}], code=code)


def entry_of(model: Any, kind: str | None = None, endpoint: str = ""):
    """The catalog entry a request's ``model`` names, which must serve ``kind`` (if given)."""
    if not isinstance(model, str) or not model:
        raise bad("model", "required: one of the models GET /openai/v1/models lists")
    entry = services().catalog.get(model)
    if entry is None:
        raise InputError(
            f"the model {model!r} does not exist; GET /openai/v1/models lists the models",
            [{"loc": ["model"], "msg": "unknown model"}],
            code="unknown_model",
        )
    if kind is not None and entry.kind != kind:
        raise bad("model", f"{model!r} is a {entry.kind} model; {endpoint} serves {kind} models")
    return entry


def submit(model: str, inp: dict[str, Any], priority: str = "normal") -> Job:
    """Submit a job as ``/v1/jobs`` does (admission, metering, Idempotency-Key)."""
    job, created = submit_job(
        services(),
        {"model": model, "input": inp, "priority": priority},
        caller=current_caller(),
        idempotency_key=request.headers.get("Idempotency-Key"),
    )
    if created:
        JOBS_SUBMITTED.labels(model=job.model).inc()
    return job


def take_slot():
    """One of the caller's stream slots (429 past the caps); returns the release."""
    return current_app.extensions["vramq.streams"].acquire(current_caller().id)


def load(job_id: str) -> tuple[Job, dict[str, Any]]:
    """The job's row and its JSON as ``/v1/jobs/<id>`` shows it."""
    with services().sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None, job_id
        return job, job_json(job, session)


def cancel(job_id: str) -> None:
    """Cancel the job if it has not ended (the caller stopped waiting for it)."""
    svc = services()
    with svc.sessions.begin() as session:
        ending = outcomes.end(
            session, outcomes.Canceled(), job_id=job_id, allowances=svc.allowances, job_json=job_json, now=svc.now()
        )
    if ending.won:
        ending.announce(svc.redis)


def follow(job_id: str, seconds: float) -> Iterator[tuple[str, dict[str, Any]]]:
    """The job's events as ``(event, data)``, from its start, ending with ``("done", {})``
    once it has ended; ``("idle", {})`` after each second without any. Past ``seconds``
    the job is canceled and ServiceUnavailable raised."""
    svc = services()
    after = "0"
    deadline = time.monotonic() + seconds
    while True:
        entries = events.read(svc.redis, job_id, after, block_ms=POLL_MS)
        for entry_id, event, data in entries:
            after = entry_id
            if event == "done":
                yield "done", {}
                return
            yield event, data
        if not entries:
            with svc.sessions() as session:
                status = session.get(Job, job_id).status
            if status in TERMINAL:
                yield "done", {}
                return
            if time.monotonic() > deadline:
                cancel(job_id)
                raise ServiceUnavailable(
                    f"job {job_id} did not finish within {seconds:g} s (VRAMQ_STREAM_SECONDS) and was canceled; "
                    "queue long work with the Batch API (/openai/v1/batches) or /v1/jobs"
                )
            yield "idle", {}


def client_gone() -> bool:
    """Has the client closed its connection? (gunicorn hands the socket to the app.)"""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def wait(job_id: str) -> tuple[Job, dict[str, Any]]:
    """Wait for the job to end; cancel it if the client hangs up (then raise)."""
    release = take_slot()
    checked = time.monotonic()
    try:
        for _event, _data in follow(job_id, current_app.config["VRAMQ"].settings.stream_s):
            if time.monotonic() - checked < GONE_CHECK_S:
                continue
            checked = time.monotonic()
            if client_gone():
                cancel(job_id)
                raise ServiceUnavailable(f"the client closed the connection; job {job_id} was canceled")
    finally:
        release()
    return load(job_id)


def failure(job: dict[str, Any]) -> ServiceUnavailable | InputError:
    """The error a synchronous call answers for a job that did not succeed."""
    err = job.get("error") or {}
    msg = f"job {job['id']} {job['status']}: {err.get('message') or err.get('code') or 'no output'}"
    if err.get("code") in ("invalid_audio", "invalid_input", "audio_too_long"):
        return InputError(msg, [{"loc": ["input"], "msg": msg}], code=err.get("code"))
    exc = ServiceUnavailable(msg)
    exc.code = str(err.get("code") or "job_" + job["status"])
    return exc
