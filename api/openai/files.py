"""``/files``: the Batch API's files. Uploads (``purpose=batch``, JSONL in OpenAI's batch
line format) are vramq files (``jobs.files``: checked, counted against the caller's
upload quota, deleted by the retention sweeper); a finished batch's output and error
files are files too (``purpose=batch_output``), made by ``batches``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from flask import Response, request

from vramq.jobs import idempotency
from vramq.jobs.db import writing
from vramq.jobs.errors import InputError, NotFound
from vramq.jobs.files import File, delete_object, get_file, store_file
from vramq.jobs.ids import new_id
from vramq.jobs.lifecycle import utcnow

from ..callers import current_caller
from ..files_api import upload_limit, upload_quota
from ..guards import MULTIPART_SLACK, body_limit
from . import bp
from .bodies import unix
from .waiting import bad, services

OUTPUT_PURPOSE = "batch_output"


def file_object(row: File) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": unix(row.created_at.isoformat()),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def read_upload(field: str = "file") -> tuple[bytes, str | None]:
    """The multipart upload's bytes and file name, within the caller's upload limit."""
    caller, settings = current_caller(), services().settings
    limit, setting, note = upload_limit(caller, settings)
    if request.mimetype != "multipart/form-data":
        raise bad(field, "send multipart/form-data with the file as field 'file'")
    request.max_content_length = limit + MULTIPART_SLACK
    upload = request.files.get(field)
    if upload is None:
        raise bad(field, "missing: send it as multipart field 'file'")
    data = upload.read(limit + 1)
    if len(data) > limit:
        msg = f"the upload exceeds the limit of {limit} bytes ({setting}){note}"
        raise InputError(msg, [{"loc": [field], "msg": msg}], code="payload_too_large")
    return data, upload.filename


def owned(file_id: str) -> File:
    """The caller's file; another caller's is 404."""
    try:
        row = get_file(services(), file_id)
    except NotFound:
        row = None
    if row is None or not current_caller().owns(row.caller):
        raise NotFound(f"no file {file_id}")
    return row


def save_output(data: bytes, filename: str, caller: str | None) -> File:
    """Store a batch's output (or error) file. It is never refused for the caller's upload
    quota, but is counted in it like any stored file until the retention sweeper deletes
    it (``VRAMQ_UPLOAD_RETENTION_HOURS`` after it was written)."""
    row = File(
        id=new_id("file"),
        purpose=OUTPUT_PURPOSE,
        filename=filename,
        bytes=len(data),
        content_type="application/jsonl",
        sha256=hashlib.sha256(data).hexdigest(),
        duration_s=None,
        caller=caller,
        created_at=utcnow(),
    )
    services().store.put(row.key, data, row.content_type)
    with writing(services().sessions) as session:
        session.add(row)
    return row


@bp.post("/files")
def create_file():
    purpose = request.form.get("purpose")
    if purpose != "batch":
        raise bad("purpose", "must be batch (vramq takes uploads for the Batch API here; audio goes with its request)")
    data, filename = read_upload()
    caller = current_caller()
    _cap, batch_limit, setting, note = body_limit("batches.create_batch", caller, services().settings)
    if len(data) > batch_limit:
        msg = f"a batch file ({len(data)} bytes) exceeds the limit of {batch_limit} bytes ({setting}){note}"
        raise InputError(msg, [{"loc": ["file"], "msg": msg}], code="payload_too_large")
    svc = services()

    def create(remember: idempotency.Remember) -> File:
        row = store_file(svc, data, filename, "batch", caller.id, quota=upload_quota(caller, svc.settings))
        with svc.sessions.begin() as session:
            remember(session, row.id)
        return row

    key = request.headers.get("Idempotency-Key")
    row, _created = idempotency.once(
        svc, caller.id, key, b"\0".join([b"batch", (filename or "").encode(), data]), create, lambda i: get_file(svc, i)
    )
    return file_object(row)


@bp.get("/files/<file_id>")
def retrieve_file(file_id: str):
    return file_object(owned(file_id))


@bp.get("/files/<file_id>/content")
def file_content(file_id: str):
    row = owned(file_id)
    return Response(services().store.get(row.key), mimetype="application/jsonl")


@bp.delete("/files/<file_id>")
def delete_file(file_id: str):
    row = owned(file_id)
    delete_object(services().store, row.id)
    with writing(services().sessions) as session:
        gone = session.get(File, row.id)
        if gone is not None:
            session.delete(gone)
    return {"id": row.id, "object": "file", "deleted": True}
