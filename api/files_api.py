"""``/v1/files``: upload (multipart) and read a file's metadata.

Uploads are far larger than the app-wide body cap (``VRAMQ_MAX_BODY_KB``), so this
route raises its own request's ``max_content_length`` to ``VRAMQ_MAX_UPLOAD_MB`` plus
room for the multipart framing, before anything reads the body.
"""

from __future__ import annotations

import json

from flask import Blueprint, current_app, request
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import RequestEntityTooLarge

from jobs import idempotency
from jobs.errors import InputError
from jobs.errors import NotFound
from jobs.files import PURPOSES, File, get_file, store_file

from .callers import current_caller
from .guards import MULTIPART_SLACK, body_limit
from .problems import problem
from jobs.views import iso

bp = Blueprint("files", __name__)


def _services():
    return current_app.config["VRAMQ"]


def render_file(row: File) -> dict:
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


def _too_large(limit: int):
    return problem(413, f"the upload exceeds the limit of {limit} bytes (VRAMQ_MAX_UPLOAD_MB)", "payload_too_large")


def _missing(field: str, msg: str):
    return problem(422, f"{field}: {msg}", "invalid_input", [{"loc": [field], "msg": msg}])


@bp.post("/v1/files")
def upload_file():
    services = _services()
    limit = services.settings.max_upload_bytes
    if request.mimetype != "multipart/form-data":
        return problem(415, "POST /v1/files takes multipart/form-data with fields file and purpose")
    request.max_content_length = limit + MULTIPART_SLACK
    try:
        upload = request.files.get("file")
        purpose = request.form.get("purpose")
    except RequestEntityTooLarge:
        return _too_large(limit)
    if upload is None:
        return _missing("file", "missing: send the file as multipart field 'file'")
    if purpose is None:
        return _missing("purpose", f"missing: one of {', '.join(PURPOSES)}")
    data = upload.read(limit + 1)
    if len(data) > limit:
        return _too_large(limit)
    if purpose == "batch":
        # A batch file becomes a batch: it may be no larger than this caller's batch body.
        _cap, batch_limit, setting, note = body_limit("batches.create_batch", current_caller(), services.settings)
        if len(data) > batch_limit:
            return problem(413, f"a batch file ({len(data)} bytes) exceeds the limit of {batch_limit} bytes "
                                f"({setting}){note}", "payload_too_large",
                           [{"loc": ["file"], "msg": f"at most {batch_limit} bytes ({setting})"}], limit_bytes=batch_limit)
    key = request.headers.get("Idempotency-Key")
    body_digest = idempotency.digest(b"\0".join([purpose.encode(), (upload.filename or "").encode(), data]))
    if key:
        idempotency.check_key(key)
        existing = idempotency.replay(services, current_caller().holder, key, body_digest)
        if existing is not None:
            return render_file(get_file(services, existing)), 200
    try:
        row = store_file(services, data, upload.filename, purpose, caller=current_caller().holder)
    except InputError as exc:
        if exc.code == "payload_too_large":
            return _too_large(limit)
        raise
    if key:
        try:
            with services.sessions.begin() as session:
                idempotency.remember(session, current_caller().holder, key, body_digest, row.id)
        except IntegrityError:  # a concurrent request with the same key won: answer with its file
            existing = idempotency.replay(services, current_caller().holder, key, body_digest)
            return render_file(get_file(services, existing)), 200
    resp = current_app.response_class(json.dumps(render_file(row)), status=201, mimetype="application/json")
    resp.headers["Location"] = f"/v1/files/{row.id}"
    return resp


@bp.get("/v1/files/<file_id>")
def read_file(file_id: str):
    row = get_file(_services(), file_id)
    if not current_caller().owns(row.caller):
        raise NotFound(f"no file {file_id}")
    return render_file(row)
