"""``/v1/batches``: submit many jobs as one, follow them, cancel them, collect the results."""

from __future__ import annotations

import json
import re
import time

from flask import Blueprint, current_app, request
from sqlalchemy import and_, func, or_, select

from vramq.jobs.batches import cancellation, creation
from vramq.jobs.batches.parsing import MAX_JOBS
from vramq.jobs.batches.views import batch_json, page, summary
from vramq.jobs.errors import NotFound
from vramq.jobs.schema import Batch, Job
from vramq.jobs.views import job_json
from vramq.jobs.webhooks.views import deliveries

from .callers import current_caller, require_account
from .guards import json_body
from .metrics import JOBS_SUBMITTED
from .queries import bad_arg, decode_cursor, encode_cursor, limit_arg, statuses_arg
from .sse import sse_frame, sse_response, stream_seconds
from .views import base_url, links

bp = Blueprint("batches", __name__)

PAGE_MAX = 1000
EVENTS_POLL_S = 1.0


def _services():
    return current_app.config["VRAMQ"]


def _load(session, batch_id: str) -> Batch:
    """The batch, if the caller owns it; another caller's batch is 404."""
    batch = session.get(Batch, batch_id)
    if batch is None or not current_caller().owns(batch.caller):
        raise NotFound(f"no batch {batch_id}")
    return batch


def _batch_json(session, batch: Batch) -> dict:
    return batch_json(batch, summary(session, batch.id), links())


@bp.post("/v1/batches")
def create_batch():
    """Accept up to 10,000 jobs at once (``jobs`` or a JSONL ``input_file``): all or none."""
    services = _services()
    caller = current_caller()
    # The body's size limit was set for this caller before it was read (api.guards:
    # VRAMQ_MAX_BODY_KB without a key, VRAMQ_MAX_BATCH_BODY_MB with one).
    body = json_body()
    max_jobs, note = MAX_JOBS, ""
    if not (caller.keyed or caller.admin):
        max_jobs = services.settings.anonymous_batch_jobs
        note = f" from a caller without an API key (VRAMQ_ANONYMOUS_BATCH_JOBS; with a key up to {MAX_JOBS})"
    batch, created = creation.create(
        services,
        body,
        caller=caller,
        idempotency_key=request.headers.get("Idempotency-Key"),
        base_url=base_url(),
        max_jobs=max_jobs,
        limit_note=note,
    )
    with services.sessions() as session:
        data = _batch_json(session, batch)
    if created:
        for model, n in _per_model(services, batch.id).items():
            JOBS_SUBMITTED.labels(model=model).inc(n)
    resp = current_app.response_class(json.dumps(data), status=202 if created else 200, mimetype="application/json")
    resp.headers["Location"] = data["links"]["self"]
    return resp


def _per_model(services, batch_id: str) -> dict[str, int]:
    with services.sessions() as session:
        return dict(
            session.execute(select(Job.model, func.count()).where(Job.batch_id == batch_id).group_by(Job.model)).all()
        )


@bp.get("/v1/batches")
def list_batches():
    """The caller's batches, newest first (``limit``, ``cursor`` as for job history)."""
    caller = require_account("batch history")
    limit = limit_arg(100, 20)
    q = select(Batch).where(Batch.caller == caller.id)
    if request.args.get("cursor"):
        created, last_id = decode_cursor(request.args["cursor"])
        q = q.where(or_(Batch.created_at < created, and_(Batch.created_at == created, Batch.id < last_id)))
    with _services().sessions() as session:
        rows = list(session.execute(q.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)).scalars())
        data = [_batch_json(session, b) for b in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "next_cursor": encode_cursor(rows[limit - 1]) if len(rows) > limit else None,
    }


@bp.get("/v1/batches/<batch_id>")
def get_batch(batch_id: str):
    with _services().sessions() as session:
        return _batch_json(session, _load(session, batch_id))


@bp.get("/v1/batches/<batch_id>/jobs")
def batch_jobs(batch_id: str):
    """The batch's jobs in submission order; ``cursor`` is the ``next_cursor`` of the page
    before, ``status`` filters (``a,b``), ``limit`` up to 1000."""
    limit = limit_arg(PAGE_MAX, 100)
    statuses = statuses_arg()
    after = request.args.get("cursor") or None
    if after is not None and not re.fullmatch(r"job_[0-9a-z]{1,40}", after):
        raise bad_arg("cursor", "is not a cursor this server gave out (use next_cursor as is)")
    with _services().sessions() as session:
        _load(session, batch_id)
        jobs = page(session, batch_id, after, limit + 1, statuses)
        lk = links()
        data = [job_json(j, lk) for j in jobs[:limit]]
    return {"object": "list", "data": data, "next_cursor": jobs[limit - 1].id if len(jobs) > limit else None}


@bp.post("/v1/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    """Cancel every job of the batch not yet finished; 409 once the batch has finished."""
    services = _services()
    with services.sessions() as session:
        _load(session, batch_id)
    lk = links()
    canceled = cancellation.cancel(services, batch_id, job_json=lambda j: job_json(j, lk))
    with services.sessions() as session:
        return {**_batch_json(session, _load(session, batch_id)), "canceled": canceled}


@bp.get("/v1/batches/<batch_id>/deliveries")
def batch_deliveries(batch_id: str):
    """The batch's own webhook deliveries (``batch.completed``) with their attempts."""
    with _services().sessions() as session:
        _load(session, batch_id)
        return {"object": "list", "data": deliveries(session, batch_id=batch_id)}


@bp.get("/v1/batches/<batch_id>/events")
def batch_events(batch_id: str):
    """Server-sent events: ``counts`` (the batch) whenever its counts or status change,
    then ``done`` (the batch, with ``results_url``) once its results are written."""
    services = _services()
    with services.sessions() as session:
        _load(session, batch_id)
    lk = links()
    seconds = stream_seconds()

    def stream():
        last = None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with services.sessions() as session:
                batch = session.get(Batch, batch_id)
                current = batch_json(batch, summary(session, batch_id), lk)
            if batch.finished_at is not None:
                yield sse_frame("done", current)
                return
            seen = (current["status"], current["counts"])
            yield sse_frame("counts", current) if seen != last else ": keep-alive\n\n"
            last = seen
            time.sleep(EVENTS_POLL_S)

    return sse_response(stream())
