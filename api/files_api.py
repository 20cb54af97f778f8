"""``/v1/files``: upload (multipart) and read a file's metadata.

Uploads are far larger than the app-wide body cap (``VRAMQ_MAX_BODY_KB``), so this
route sets its own request's ``max_content_length`` to the caller's upload limit plus
room for the multipart framing, before anything reads the body: ``VRAMQ_MAX_UPLOAD_MB``
with an API key, the smaller ``VRAMQ_ANONYMOUS_MAX_UPLOAD_MB`` without one. A
``Content-Length`` past it is 413 before a byte is read.

What a caller keeps stored is bounded too: ``VRAMQ_UPLOAD_QUOTA_MB`` per account,
``VRAMQ_ANONYMOUS_UPLOAD_QUOTA_MB`` per anonymous network (413 ``upload_quota_exceeded``).
"""

from __future__ import annotations

import json

from flask import Blueprint, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from vramq.jobs import idempotency
from vramq.jobs.errors import InputError, NotFound
from vramq.jobs.files import PURPOSES, File, UploadQuotaExceeded, get_file, store_file
from vramq.jobs.views import iso

from .callers import current_caller
from .guards import MULTIPART_SLACK, body_limit
from .problems import problem

bp = Blueprint("files", __name__)


def _services():
    return current_app.config["VRAMQ"]


def file_json(row: File) -> dict:
    """A file as the API shows it."""
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "content_type": row.content_type,
        "purpose": row.purpose,
        "filename": row.filename,
        "duration": row.duration_s,
        "created_at": iso(row.created_at),
    }


def upload_limit(caller, settings) -> tuple[int, str, str]:
    """``(bytes, setting, note)``: the largest file this caller may upload."""
    if caller.keyed or caller.admin or settings.anonymous_max_upload_bytes >= settings.max_upload_bytes:
        return settings.max_upload_bytes, "VRAMQ_MAX_UPLOAD_MB", ""
    return (
        settings.anonymous_max_upload_bytes,
        "VRAMQ_ANONYMOUS_MAX_UPLOAD_MB",
        f"; with an API key a file may be up to {settings.max_upload_bytes} bytes (VRAMQ_MAX_UPLOAD_MB)",
    )


def upload_quota(caller, settings) -> tuple[int, str] | None:
    """``(bytes, setting)``: how much this caller may keep uploaded; None: no quota."""
    if caller.admin:
        return None
    if caller.keyed:
        return settings.upload_quota_bytes, "VRAMQ_UPLOAD_QUOTA_MB"
    return settings.anonymous_upload_quota_bytes, "VRAMQ_ANONYMOUS_UPLOAD_QUOTA_MB"


def _too_large(limit: int, setting: str = "VRAMQ_MAX_UPLOAD_MB", note: str = "", length: int | None = None):
    size = f" ({length} bytes)" if length is not None else ""
    return problem(
        413,
        f"the upload{size} exceeds the limit of {limit} bytes ({setting}){note}",
        "payload_too_large",
        [{"loc": ["file"], "msg": f"at most {limit} bytes ({setting})"}],
        limit_bytes=limit,
    )


def _over_quota(exc: UploadQuotaExceeded):
    return problem(
        413,
        str(exc),
        "upload_quota_exceeded",
        exc.errors,
        quota_bytes=exc.quota,
        used_bytes=exc.used,
        setting=exc.setting,
    )


def _missing(field: str, msg: str):
    return problem(422, f"{field}: {msg}", "invalid_input", [{"loc": [field], "msg": msg}])


@bp.post("/v1/files")
def upload_file():
    services = _services()
    caller = current_caller()
    limit, setting, note = upload_limit(caller, services.settings)
    if request.mimetype != "multipart/form-data":
        return problem(415, "POST /v1/files takes multipart/form-data with fields file and purpose")
    request.max_content_length = limit + MULTIPART_SLACK
    if request.content_length is not None and request.content_length > limit + MULTIPART_SLACK:
        return _too_large(limit, setting, note, request.content_length)  # nothing of the body is read
    try:
        upload = request.files.get("file")
        purpose = request.form.get("purpose")
    except RequestEntityTooLarge:
        return _too_large(limit, setting, note)
    if upload is None:
        return _missing("file", "missing: send the file as multipart field 'file'")
    if purpose is None:
        return _missing("purpose", f"missing: one of {', '.join(PURPOSES)}")
    data = upload.read(limit + 1)
    if len(data) > limit:
        return _too_large(limit, setting, note)
    if purpose == "batch":
        # A batch file becomes a batch: it may be no larger than this caller's batch body.
        _cap, batch_limit, setting, note = body_limit("batches.create_batch", current_caller(), services.settings)
        if len(data) > batch_limit:
            return problem(
                413,
                f"a batch file ({len(data)} bytes) exceeds the limit of {batch_limit} bytes ({setting}){note}",
                "payload_too_large",
                [{"loc": ["file"], "msg": f"at most {batch_limit} bytes ({setting})"}],
                limit_bytes=batch_limit,
            )

    def create(remember: idempotency.Remember) -> File:
        row = store_file(
            services, data, upload.filename, purpose, caller=caller.id, quota=upload_quota(caller, services.settings)
        )
        with services.sessions.begin() as session:
            remember(session, row.id)
        return row

    try:
        row, created = idempotency.once(
            services,
            caller.id,
            request.headers.get("Idempotency-Key"),
            b"\0".join([purpose.encode(), (upload.filename or "").encode(), data]),
            create,
            lambda file_id: get_file(services, file_id),
        )
    except UploadQuotaExceeded as exc:
        return _over_quota(exc)
    except InputError as exc:
        if exc.code == "payload_too_large":
            return _too_large(limit)
        raise
    if not created:  # an earlier upload with this Idempotency-Key (or a concurrent one that won)
        return file_json(row), 200
    resp = current_app.response_class(json.dumps(file_json(row)), status=201, mimetype="application/json")
    resp.headers["Location"] = f"/v1/files/{row.id}"
    return resp


@bp.get("/v1/files/<file_id>")
def read_file(file_id: str):
    row = get_file(_services(), file_id)
    if not current_caller().owns(row.caller):
        raise NotFound(f"no file {file_id}")
    return file_json(row)
