"""A finished batch's output and error files, in OpenAI's batch line format.

One line per job, in submission order: a job that succeeded goes to the output file as
``{"id", "custom_id", "response": {"status_code": 200, "request_id", "body"}, "error": null}``
with ``body`` the endpoint's own response; a job that failed goes to the error file with
``status_code`` 500 and an OpenAI error as its body; a job canceled (the batch was
canceled or expired before it ran) with ``response: null`` and ``error``
``batch_cancelled`` or ``batch_expired``. Written once, by the first request that finds
every job ended (a Redis lock keeps concurrent readers from writing them twice).
"""

from __future__ import annotations

import json
from typing import Any

from vramq.jobs.batches.views import page
from vramq.jobs.views import job_json

from ..views import links
from .bodies import chat_response, completion_response, image_response
from .files import save_output
from .waiting import services

LOCK_S = 300


def _body(endpoint: str, job: dict[str, Any], row) -> dict[str, Any]:
    if endpoint == "/v1/chat/completions":
        return chat_response(job)
    if endpoint == "/v1/completions":
        return completion_response(job)
    from .images import image_keys

    fmt = (row.meta or {}).get("response_format", "url")
    return image_response(job, fmt, image_keys(row.output or {}), services().store.get)


def _line(endpoint: str, row, lk, expired: bool) -> tuple[bool, dict[str, Any]]:
    """``(succeeded, line)`` for one job of the batch."""
    job = job_json(row, lk)
    head = {"id": f"batch_req_{row.id}", "custom_id": row.custom_id}
    if row.status == "succeeded" and job["output"] is not None:
        body = _body(endpoint, job, row)
        return True, {**head, "response": {"status_code": 200, "request_id": row.id, "body": body}, "error": None}
    if row.status == "canceled":
        code = "batch_expired" if expired else "batch_cancelled"
        why = (
            "the batch expired before this request ran"
            if expired
            else "the batch was cancelled before this request ran"
        )
        return False, {**head, "response": None, "error": {"code": code, "message": why}}
    err = job["error"] or {"code": "job_failed", "message": "no output"}
    body = {"error": {"message": err["message"], "type": "server_error", "param": None, "code": err["code"]}}
    return False, {**head, "response": {"status_code": 500, "request_id": row.id, "body": body}, "error": None}


def finalize(record: dict[str, Any], canceled: bool) -> bool:
    """Write the files of a batch whose jobs have all ended and mark it done; True once it
    is done, False while another request is writing them."""
    from .batches import save

    if record.get("status"):
        return True
    svc = services()
    lock = f"vramq:openai:finalize:{record['id']}"
    if not svc.redis.set(lock, 1, nx=True, ex=LOCK_S):
        return False
    try:
        now = int(svc.now().timestamp())
        expired = record.get("expired_at") is not None
        out: list[str] = []
        err: list[str] = []
        counts = {"total": 0, "completed": 0, "failed": 0}
        lk, after = links(), None
        with svc.sessions() as session:
            while True:
                rows = page(session, record["id"], after, 500)
                if not rows:
                    break
                for row in rows:
                    ok, line = _line(record["endpoint"], row, lk, expired)
                    (out if ok else err).append(json.dumps(line, separators=(",", ":")))
                    counts["total"] += 1
                    counts["completed" if ok else "failed"] += 1
                after = rows[-1].id
        caller = record["caller"]
        if out:
            record["output_file_id"] = save_output(("\n".join(out) + "\n").encode(), "batch_output.jsonl", caller).id
        if err:
            record["error_file_id"] = save_output(("\n".join(err) + "\n").encode(), "batch_errors.jsonl", caller).id
        record["request_counts"] = counts
        record["finalizing_at"] = now
        if expired:
            record["status"] = "expired"
        elif canceled:
            record["status"], record["cancelled_at"] = "cancelled", now
        else:
            record["status"], record["completed_at"] = "completed", now
        save(record)
        return True
    finally:
        svc.redis.delete(lock)
