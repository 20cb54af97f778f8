"""``/v1/jobs``: submit, read, list, cancel, follow, save, share; and ``/s/<token>``."""

from __future__ import annotations

import json
import time

from flask import Blueprint, current_app, request
from sqlalchemy import and_, or_, select

from vramq.jobs import events, ledger, outcomes, retention
from vramq.jobs.db import writing
from vramq.jobs.errors import Forbidden, NotFound
from vramq.jobs.lifecycle import TERMINAL, raise_not_cancelable
from vramq.jobs.outcomes import Canceled
from vramq.jobs.schema import Job
from vramq.jobs.submit import check_job, parse_request, submit_job
from vramq.jobs.webhooks import signing
from vramq.jobs.webhooks.views import deliveries

from . import web_page
from .callers import current_caller, require_account, require_admin
from .guards import json_body
from .metrics import JOBS_SUBMITTED
from .queries import decode_cursor, encode_cursor, kind_arg, limit_arg, statuses_arg
from .sse import last_event_id, sse_frame, sse_response, stream_seconds
from .views import base_url, job_json

bp = Blueprint("jobs", __name__)


def _services():
    return current_app.config["VRAMQ"]


@bp.post("/v1/jobs")
def create_job():
    services = _services()
    body = json_body()  # strict JSON, within this request's size limit (api.guards)
    key = request.headers.get("Idempotency-Key")
    job, created = submit_job(services, body, caller=current_caller(), idempotency_key=key)
    if created:
        JOBS_SUBMITTED.labels(model=job.model).inc()
    # No queue position in the answer: it counts the jobs ahead, which would cost a
    # submit more than the rest of it (GET the job's ``links.self`` for it).
    data = job_json(job)
    resp = current_app.response_class(json.dumps(data), status=202 if created else 200, mimetype="application/json")
    resp.headers["Location"] = data["links"]["self"]
    return resp


@bp.post("/v1/estimate")
def estimate():
    """What a job would reserve, without submitting it: the body of ``POST /v1/jobs``
    (checked the same way, 422 naming the field), and the caller's tokens left."""
    services = _services()
    req = parse_request(json_body())
    caller = current_caller()
    entry, _inp, units = check_job(services, req.model, req.input, caller)
    quote = services.estimator.quote(entry, units)
    with services.sessions() as session:
        left = ledger.usage(session, caller.id, caller.tier, services.allowances, services.now()).available
    tokens = 0 if caller.admin else quote.tokens
    return {
        "object": "estimate",
        "model": entry.id,
        "tokens": tokens,
        "units": round(units, 6),
        "tokens_per_gpu_second": quote.rate,
        "min_tokens": quote.min_tokens,
        "tokens_left": left,
        "enough": caller.admin or tokens <= left,
    }


def _load(session, job_id: str) -> Job:
    """The job, if the caller owns it; another caller's job is 404 (no existence leak)."""
    job = session.get(Job, job_id)
    if job is None or not current_caller().owns(job.caller):
        raise NotFound(f"no job {job_id}")
    return job


@bp.get("/v1/jobs/<job_id>")
def get_job(job_id: str):
    with _services().sessions() as session:
        return job_json(_load(session, job_id), session)


HISTORY_MAX = 100


@bp.get("/v1/jobs")
def list_jobs():
    """The caller's jobs, newest first. The cursor is the last job of a page (its
    ``created_at`` and id), so pages stay stable while new jobs arrive."""
    caller = require_account("job history")
    return _history(select(Job).where(Job.caller == caller.id))


@bp.get("/v1/admin/jobs")
def admin_jobs():
    """Every caller's jobs, newest first (admin only), filtered like the history and by
    ``code`` (the error code) and ``caller``: ``?status=failed&code=worker_lost`` is the
    dead-letter view, the jobs that killed their workers ``VRAMQ_MAX_ATTEMPTS`` times."""
    require_admin()
    q = select(Job)
    if request.args.get("code"):
        q = q.where(Job.error_code == request.args["code"])
    if request.args.get("caller"):
        q = q.where(Job.caller == request.args["caller"])
    return _history(q)


def _history(q):
    """One page of the jobs ``q`` selects, with the history's filters and cursor."""
    args = request.args
    wanted = statuses_arg()
    if wanted:
        q = q.where(Job.status.in_(wanted))
    if args.get("model"):
        q = q.where(Job.model == args["model"])
    if args.get("kind"):
        q = q.where(Job.kind == kind_arg())
    limit = limit_arg(HISTORY_MAX, 20)
    if args.get("cursor"):
        created, last_id = decode_cursor(args["cursor"])
        q = q.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id)))
    q = q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    with _services().sessions() as session:
        rows = list(session.execute(q).scalars())
        page = rows[:limit]
        data = [job_json(j, session) for j in page]
    more = len(rows) > limit
    return {"object": "list", "data": data, "next_cursor": encode_cursor(page[-1]) if more else None}


@bp.post("/v1/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    """Cancel. A queued job gets its reservation back; a running one is charged its
    model's minimum (it held a GPU slot) and stops between steps."""
    services = _services()
    now = services.now()
    with services.sessions() as session:
        _load(session, job_id)  # 404 for another caller's job
    with services.sessions.begin() as session:
        # Its first statement is a write (see jobs.db.writing).
        ending = outcomes.end(
            session, Canceled(), job_id=job_id, allowances=services.allowances, job_json=job_json, now=now
        )
        if not ending.won:
            raise_not_cancelable(session, job_id)
    ending.announce(services.redis)
    with services.sessions() as session:
        return job_json(_load(session, job_id), session)


@bp.get("/v1/jobs/<job_id>/deliveries")
def job_deliveries(job_id: str):
    """The job's webhook deliveries, each with every attempt and what the receiver answered."""
    with _services().sessions() as session:
        _load(session, job_id)
        return {"object": "list", "data": deliveries(session, job_id)}


@bp.get("/v1/webhooks/secret")
def webhook_secret():
    """The account's Standard Webhooks signing secret (``whsec_…``), made on first use."""
    caller = require_account("a webhook secret")
    if caller.account_id is None:  # not keyed
        raise Forbidden("the admin key has no webhook secret; webhooks belong to accounts")
    with _services().sessions.begin() as session:
        return {"secret": signing.secret_for(session, caller.account_id)}


@bp.post("/v1/jobs/<job_id>/save")
def save_job(job_id: str):
    """Keep the job's outputs past retention (needs an account)."""
    return _set_saved(job_id, True)


@bp.delete("/v1/jobs/<job_id>/save")
def unsave_job(job_id: str):
    """Let the outputs expire again, ``VRAMQ_RETENTION_HOURS`` after the job finished."""
    return _set_saved(job_id, False)


def _set_saved(job_id: str, keep: bool):
    require_account("saving results")
    services = _services()
    with services.sessions() as session:
        job = _load(session, job_id)
    with services.sessions.begin() as session:
        retention.save(session, job, keep)
    with services.sessions() as session:
        return job_json(_load(session, job_id), session)


@bp.post("/v1/jobs/<job_id>/share")
def share_job(job_id: str):
    """A public read-only link to the job (``/s/<token>``); the same link until revoked."""
    services = _services()
    with services.sessions() as session:
        job = _load(session, job_id)
    with writing(services.sessions) as session:
        token = retention.share(session, job, services.now()).token
    return {"url": base_url() + f"s/{token}", "token": token}


@bp.delete("/v1/jobs/<job_id>/share")
def unshare_job(job_id: str):
    """Revoke the job's share link: it answers 404 from now on."""
    services = _services()
    with services.sessions() as session:
        job = _load(session, job_id)
    with services.sessions.begin() as session:
        revoked = retention.unshare(session, job, services.now())
    return {"revoked": revoked}


@bp.get("/s/<token>")
def shared(token: str):
    """A shared job, read-only and without a key: what was asked and what came out. A
    browser (HTML preferred to JSON) gets the web page, which shows it; 404 once revoked."""
    with _services().sessions() as session:
        job = retention.shared_job(session, token)
        if web_page.wants_page():
            return web_page.page(200 if job is not None else 404)
        if job is None:
            raise NotFound("no such share link (it may have been revoked)")
        full = job_json(job, None)
    keep = (
        "id",
        "object",
        "model",
        "kind",
        "status",
        "created_at",
        "finished_at",
        "input",
        "output",
        "error",
        "expires_at",
        "outputs_expired",
    )
    return {k: full[k] for k in keep}


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
    after = last_event_id()
    seconds = stream_seconds()

    def done_frame(event_id: str | None) -> str:
        with services.sessions() as session:
            return sse_frame("done", job_json(session.get(Job, job_id), session), event_id)

    def stream():
        nonlocal after
        if after == "0":
            yield sse_frame("status", {"status": status})
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            entries = events.read(services.redis, job_id, after, block_ms=1000)
            for entry_id, event, data in entries:
                after = entry_id
                if event == "done":
                    yield done_frame(entry_id)
                    return
                yield sse_frame(event, data, entry_id)
            if not entries:
                # Nothing new for a second: the row says whether the job ended without a
                # ``done`` in the stream (it expired, or the job was canceled while queued).
                with services.sessions() as session:
                    finished = session.get(Job, job_id).status in TERMINAL
                if finished:
                    yield done_frame(None)
                    return
                yield ": keep-alive\n\n"

    return sse_response(stream())
