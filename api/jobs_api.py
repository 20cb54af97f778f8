"""``/v1/jobs``: submit, read, cancel, follow."""

from __future__ import annotations

import json
import time

from flask import Blueprint, Response, current_app, request, stream_with_context

from werkzeug.exceptions import BadRequest

from jobs.errors import NotFound
from jobs.lifecycle import TERMINAL, cancel
from jobs.schema import Job
from jobs.submit import submit_job

from .callers import idempotency_scope
from .metrics import JOBS_SUBMITTED
from .problems import problem
from .render import render_job

bp = Blueprint("jobs", __name__)


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
    with services.sessions() as session:
        return render_job(_load(session, job_id), session)


@bp.get("/v1/jobs/<job_id>/events")
def job_events(job_id: str):
    """Server-sent events: ``status`` and ``progress`` as they change, then ``done``.

    Event ids count up per stream; a client reconnecting with ``Last-Event-ID`` gets the
    current state again (state events are idempotent), so nothing it needs is lost.
    """
    services = _services()
    with services.sessions() as session:
        _load(session, job_id)

    def stream():
        seq, last = 0, (None, None)
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            with services.sessions() as session:
                job = session.get(Job, job_id)
                state = (job.status, round(job.progress, 3))
                rendered = render_job(job, session) if job.status in TERMINAL else None
            if state[0] != last[0]:
                seq += 1
                yield f"id: {seq}\nevent: status\ndata: {json.dumps({'status': state[0]})}\n\n"
            if state[1] != last[1]:
                seq += 1
                yield f"id: {seq}\nevent: progress\ndata: {json.dumps({'progress': state[1]})}\n\n"
            last = state
            if rendered is not None:
                seq += 1
                yield f"id: {seq}\nevent: done\ndata: {json.dumps(rendered)}\n\n"
                return
            time.sleep(0.25)

    return Response(
        stream_with_context(stream()),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
