"""``/v1/jobs``: submit, read, cancel, follow."""

from __future__ import annotations

import json
import time

from flask import Blueprint, Response, current_app, request, stream_with_context

from werkzeug.exceptions import BadRequest

from jobs import events
from jobs.errors import NotFound
from jobs.lifecycle import TERMINAL, cancel
from jobs.schema import Job
from jobs.submit import submit_job

from .callers import idempotency_scope
from .metrics import JOBS_SUBMITTED
from .problems import problem
from .render import render_job

bp = Blueprint("jobs", __name__)

#: An event stream is closed after this long; clients reconnect with Last-Event-ID.
STREAM_MAX_S = 3600


def _services():
    return current_app.config["VRAMQ"]


def _json_body():
    raw = request.get_data(cache=False)
    limit = request.max_content_length
    if limit is not None and len(raw) >= limit:
        # werkzeug stops a streamed (chunked) body at the limit without complaint;
        # one more read tells a body of exactly the limit from a longer one (413).
        request.stream.read(1)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None


@bp.post("/v1/jobs")
def create_job():
    services = _services()
    body = _json_body()
    key = request.headers.get("Idempotency-Key")
    job, created = submit_job(services, body, caller=None, scope=idempotency_scope(), idempotency_key=key)
    if created:
        JOBS_SUBMITTED.labels(model=job.model).inc()
    with services.sessions() as session:
        rendered = render_job(job, session)
    resp = current_app.response_class(json.dumps(rendered), status=202 if created else 200, mimetype="application/json")
    resp.headers["Location"] = rendered["links"]["self"]
    return resp


def _load(session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


@bp.get("/v1/jobs/<job_id>")
def get_job(job_id: str):
    with _services().sessions() as session:
        return render_job(_load(session, job_id), session)


@bp.get("/v1/jobs")
def list_jobs():
    return problem(401, "job history needs an API key (Authorization: Bearer …)", "unauthorized")


@bp.post("/v1/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    services = _services()
    with services.sessions.begin() as session:
        cancel(session, job_id)
    try:
        events.emit(services.redis, job_id, "status", {"status": "canceled"})
        events.emit(services.redis, job_id, "done", {"status": "canceled"})
    except Exception:  # the live view is best effort; the row already says canceled
        pass
    with services.sessions() as session:
        return render_job(_load(session, job_id), session)


@bp.get("/v1/jobs/<job_id>/events")
def job_events(job_id: str):
    """Server-sent events: ``status``, ``progress``, ``delta`` (text), then ``done`` with the job.

    Event ids are the job's event-stream ids; reconnecting with ``Last-Event-ID`` resumes
    right after the last event received. Without it the stream starts with the job's
    current status and replays every event since the job started, so the ``delta``
    events always add up to the whole text.
    """
    services = _services()
    with services.sessions() as session:
        job = _load(session, job_id)
        status = job.status
    after = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0"

    def frame(event: str, data: dict, event_id: str | None = None) -> str:
        head = f"id: {event_id}\n" if event_id else ""
        return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"

    def done_frame(event_id: str | None) -> str:
        with services.sessions() as session:
            return frame("done", render_job(session.get(Job, job_id), session), event_id)

    def stream():
        nonlocal after
        if after == "0":
            yield frame("status", {"status": status})
        deadline = time.monotonic() + STREAM_MAX_S
        while time.monotonic() < deadline:
            entries = events.read(services.redis, job_id, after, block_ms=1000)
            for entry_id, event, data in entries:
                after = entry_id
                if event == "done":
                    yield done_frame(entry_id)
                    return
                yield frame(event, data, entry_id)
            if not entries:
                # Nothing new for a second: the row says whether the job ended without a
                # ``done`` in the stream (it expired, or the job was canceled while queued).
                with services.sessions() as session:
                    finished = session.get(Job, job_id).status in TERMINAL
                if finished:
                    yield done_frame(None)
                    return
                yield ": keep-alive\n\n"

    return Response(
        stream_with_context(stream()),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
