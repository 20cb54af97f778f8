"""``/batches``: OpenAI's Batch API over a vramq batch.

``POST /batches`` reads the uploaded JSONL (``custom_id``, ``method``, ``url``, ``body``
per line), reads every line's ``body`` as the endpoint's request (``bodies``) and
submits the lines as one vramq batch (``jobs.batches``: validated whole, at most
vramq's batch limit, ``low`` priority, fair turns between callers). A line that is not a
valid request fails the whole batch before anything is queued: the batch is answered
``failed`` with every bad line in ``errors``.

What OpenAI's batch has and vramq's does not (the endpoint, the window, the file ids,
the times of its states) is kept as a small JSON record in the object store,
``openai/batches/<batch id>.json``. The state is worked out when the batch is read:

- ``in_progress`` while any job is queued or running, ``cancelling`` once canceled;
- once every job has ended: the output and error files are written (``finalizing``
  while one request writes them), then ``completed``, ``cancelled`` or ``expired``;
- past its ``completion_window`` (24 h) an unfinished batch is canceled when it is next
  read and ends ``expired``: the lines that ran are in the output file and billed, the
  rest are refunded and listed in the error file as ``batch_expired``.
"""

from __future__ import annotations

import json
from typing import Any

from flask import request
from sqlalchemy import and_, or_, select

from vramq.jobs import strictjson
from vramq.jobs.batches import cancellation, creation
from vramq.jobs.batches.parsing import MAX_ERRORS_LISTED, MAX_JOBS
from vramq.jobs.batches.views import summary
from vramq.jobs.errors import Conflict, InputError, NotFound
from vramq.jobs.ids import new_id
from vramq.jobs.schema import Batch

from ..callers import current_caller, require_account
from ..guards import json_body
from ..queries import limit_arg
from ..views import base_url
from . import bp
from .bodies import chat_request, completion_request, image_request
from .errors import param_of
from .outputs import finalize
from .waiting import bad, services

ENDPOINTS = {
    "/v1/chat/completions": ("text", chat_request),
    "/v1/completions": ("text", completion_request),
    "/v1/images/generations": ("image", image_request),
}
WINDOW_S = 24 * 3600
MAX_METADATA_PAIRS = 16
#: A page of ``GET /batches`` looks at most this many of the caller's batches (native ones are skipped).
LIST_SCAN = 1000


def record_key(batch_id: str) -> str:
    return f"openai/batches/{batch_id}.json"


def save(record: dict[str, Any]) -> None:
    services().store.put(record_key(record["id"]), json.dumps(record).encode(), "application/json")


def load(batch_id: str) -> dict[str, Any]:
    """The caller's batch record; another caller's (or a native batch) is 404."""
    try:
        record = json.loads(services().store.get(record_key(batch_id)))
    except (NotFound, ValueError):
        record = None
    if record is None or not current_caller().owns(record.get("caller")):
        raise NotFound(f"no batch {batch_id}")
    return record


def _lines(file_id: str) -> list[tuple[int, Any]]:
    from .files import owned

    try:
        row = owned(file_id)
    except NotFound:
        raise bad("input_file_id", f"no file {file_id} (upload it with POST /openai/v1/files, purpose batch)") from None
    if row.purpose != "batch":
        raise bad("input_file_id", f"file {file_id} has purpose {row.purpose!r}, not batch")
    text = services().store.get(row.key).decode("utf-8")
    return [(n, strictjson.loads(raw)) for n, raw in enumerate(text.splitlines(), 1) if raw.strip()]


def _jobs(endpoint: str, lines: list[tuple[int, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The vramq batch's jobs, and the OpenAI errors of the lines that are not requests."""
    kind, read = ENDPOINTS[endpoint]
    jobs, errors = [], []
    for number, line in lines:
        try:
            if not isinstance(line, dict):
                raise bad("line", "must be a JSON object with custom_id, method, url and body")
            if line.get("method", "POST") != "POST":
                raise bad("method", "must be POST")
            if line.get("url") != endpoint:
                raise bad("url", f"must be the batch's endpoint {endpoint}")
            model, inp, *rest = read(line.get("body"))
            assert isinstance(inp, dict)
            if rest and rest[0] is True:
                raise bad("body.stream", "a batch line cannot stream")
            entry = services().catalog.get(model) if isinstance(model, str) else None
            if entry is None or entry.kind != kind:
                raise bad("body.model", f"{model!r} is not a {kind} model of this server (GET /openai/v1/models)")
            if kind == "image" and rest and rest[0] not in ("url", "b64_json"):
                raise bad("body.response_format", "must be url or b64_json")
            _check_input(entry, inp)
            job = {"custom_id": line.get("custom_id"), "model": model, "input": inp}
            if kind == "image":  # how the output file shows the images
                job["metadata"] = {"response_format": rest[0]}
            jobs.append(job)
        except InputError as exc:
            e = (exc.errors or [{"loc": [], "msg": str(exc)}])[0]
            errors.append(
                {"code": "invalid_request", "message": str(exc), "param": ".".join(map(str, e["loc"])), "line": number}
            )
    return jobs, errors


def _check_input(entry, inp: dict[str, Any]) -> None:
    """The catalog's check of the input (cheap: no tokenizer), its field named as the body's."""
    try:
        entry.validate_input(dict(inp))
    except InputError as exc:
        e = exc.errors[0]
        raise bad("body." + (param_of(e["loc"]) or "input"), e["msg"]) from None


def _vramq_errors(exc: InputError, lines: list[tuple[int, Any]]) -> list[dict[str, Any]]:
    """vramq's batch errors (``loc`` ``["jobs", index, …]``) as OpenAI's, by line."""
    out = []
    for e in exc.errors or [{"loc": [], "msg": str(exc)}]:
        loc = list(e.get("loc") or [])
        line = lines[loc[1]][0] if len(loc) > 1 and loc[0] == "jobs" and isinstance(loc[1], int) else None
        rest = [str(p) for p in loc[2:]]
        param = "body." + ".".join(rest[1:] if rest[:1] == ["input"] else rest) if rest else None
        out.append(
            {
                "code": e.get("code") or exc.code,
                "message": f"{param or 'batch'}: {e['msg']}",
                "param": param,
                "line": line,
            }
        )
    return out


@bp.post("/batches")
def create_batch():
    body = json_body()
    if not isinstance(body, dict):
        raise bad("body", "must be a JSON object")
    endpoint = body.get("endpoint")
    if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
        raise bad(
            "endpoint",
            f"must be one of {', '.join(ENDPOINTS)} (audio cannot be batched here: it is uploaded per request)",
        )
    if body.get("completion_window") != "24h":
        raise bad("completion_window", "must be 24h")
    metadata = body.get("metadata") or {}
    if (
        not isinstance(metadata, dict)
        or len(metadata) > MAX_METADATA_PAIRS
        or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise bad("metadata", f"at most {MAX_METADATA_PAIRS} pairs of strings")
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str):
        raise bad("input_file_id", "required: the id of a file uploaded with purpose batch")
    caller = current_caller()
    max_jobs, note = MAX_JOBS, ""
    if not (caller.keyed or caller.admin):
        max_jobs = services().settings.anonymous_batch_jobs
        note = f" from a caller without an API key (VRAMQ_ANONYMOUS_BATCH_JOBS; with a key up to {MAX_JOBS})"
    lines = _lines(file_id)
    if len(lines) > max_jobs:
        raise bad("input_file_id", f"the file has {len(lines)} requests; a batch holds at most {max_jobs}{note}")
    jobs, errors = _jobs(endpoint, lines)
    errors = errors[:MAX_ERRORS_LISTED]  # a rejected batch lists this many bad lines at most
    record: dict[str, Any] = {
        "caller": caller.id,
        "endpoint": endpoint,
        "input_file_id": file_id,
        "completion_window": "24h",
        "metadata": metadata,
        "created_at": int(services().now().timestamp()),
    }
    batch = None
    if not errors:
        try:
            batch, created = creation.create(
                services(),
                {"jobs": jobs, "priority": "low", "metadata": metadata},
                caller=caller,
                idempotency_key=request.headers.get("Idempotency-Key"),
                base_url=base_url(),
                max_jobs=max_jobs,
                limit_note=note,
            )
        except InputError as exc:
            if exc.code == "payload_too_large":
                raise
            errors = _vramq_errors(exc, lines)
        else:
            if not created:  # the same request made earlier with this Idempotency-Key
                return view(load(batch.id))
    if errors:
        record.update(id=new_id("batch"), status="failed", failed_at=record["created_at"], errors=errors)
    else:
        assert batch is not None
        record["id"] = batch.id
    save(record)
    return view(record)


def _counts(batch_id: str) -> tuple[dict[str, int], bool]:
    """The batch's job counts by status, and whether it was canceled."""
    with services().sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None, batch_id
        return summary(session, batch_id)["counts"], batch.canceled_at is not None


def view(record: dict[str, Any]) -> dict[str, Any]:
    """The batch as OpenAI shows it; a batch whose jobs have all ended is finalized here."""
    counts = {"total": 0, "completed": 0, "failed": 0}
    status = record.get("status")
    if status is None:
        c, canceled = _counts(record["id"])
        now = services().now().timestamp()
        if c["queued"] + c["running"] and now > record["created_at"] + WINDOW_S and not canceled:
            try:
                cancellation.cancel(services(), record["id"])
            except Conflict:  # it ended meanwhile
                pass
            record["expired_at"] = int(now)
            save(record)
            c, canceled = _counts(record["id"])
        counts = {"total": c["total"], "completed": c["succeeded"], "failed": c["failed"] + c["canceled"]}
        if c["queued"] + c["running"]:
            status = "cancelling" if canceled else "in_progress"
        else:
            status = record["status"] if finalize(record, canceled) else "finalizing"
    return {
        "id": record["id"],
        "object": "batch",
        "endpoint": record["endpoint"],
        "errors": {"object": "list", "data": record["errors"]} if record.get("errors") else None,
        "input_file_id": record["input_file_id"],
        "completion_window": record["completion_window"],
        "status": status,
        "output_file_id": record.get("output_file_id"),
        "error_file_id": record.get("error_file_id"),
        "created_at": record["created_at"],
        "in_progress_at": None if record.get("failed_at") else record["created_at"],
        "expires_at": record["created_at"] + WINDOW_S,
        "finalizing_at": record.get("finalizing_at"),
        "completed_at": record.get("completed_at"),
        "failed_at": record.get("failed_at"),
        "expired_at": record.get("expired_at"),
        "cancelling_at": record.get("cancelling_at"),
        "cancelled_at": record.get("cancelled_at"),
        "request_counts": record.get("request_counts") or counts,
        "metadata": record["metadata"],
    }


@bp.get("/batches/<batch_id>")
def retrieve_batch(batch_id: str):
    return view(load(batch_id))


@bp.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    record = load(batch_id)
    if record.get("status") is None:
        cancellation.cancel(services(), batch_id)  # 409 once it has finished
        record["cancelling_at"] = int(services().now().timestamp())
        save(record)
    else:
        raise Conflict(f"batch {batch_id} already {record['status']}")
    return view(record)


@bp.get("/batches")
def list_batches():
    """The caller's batches made through this API, newest first; ``after`` is the last id of the page before."""
    caller = require_account("batch history")
    limit = limit_arg(100, 20)
    q = select(Batch).where(Batch.caller == caller.id)
    after = request.args.get("after")
    with services().sessions() as session:
        if after:
            last = session.get(Batch, after)
            if last is None or last.caller != caller.id:
                raise bad("after", f"no batch {after}")
            q = q.where(
                or_(Batch.created_at < last.created_at, and_(Batch.created_at == last.created_at, Batch.id < after))
            )
        ids = list(
            session.execute(
                q.with_only_columns(Batch.id).order_by(Batch.created_at.desc(), Batch.id.desc()).limit(LIST_SCAN)
            ).scalars()
        )
    data: list[dict[str, Any]] = []
    more = False
    for batch_id in ids:
        try:
            record = load(batch_id)
        except NotFound:  # a batch made with /v1/batches
            continue
        if len(data) == limit:
            more = True
            break
        data.append(view(record))
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }
