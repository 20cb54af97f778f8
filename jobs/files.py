"""Uploaded files: audio for speech jobs, JSONL for batches.

A file is a row in ``files`` (what it is) and an object ``files/<file_id>`` in the store
(its bytes). The object is written before the row, so a row always has its bytes; a
failed insert deletes the object again. The retention sweeper (jobs.retention) deletes
both ``VRAMQ_UPLOAD_RETENTION_HOURS`` after the upload, once no open job or batch needs
the file: the object first, then the row.

Content is checked, never trusted from the name or the declared type: audio is
decoded in full (``jobs.audio.probe_audio``), within bounds (``audio_seconds_limit``,
``VRAMQ_AUDIO_PROBE_CPU_SECONDS``); JSONL must be UTF-8 with one JSON object per line.

A caller's live uploads (rows in ``files`` by ``caller``) may hold at most a quota of
bytes (``VRAMQ_UPLOAD_QUOTA_MB`` for accounts, ``VRAMQ_ANONYMOUS_UPLOAD_QUOTA_MB`` for an
anonymous network). It is counted in the transaction that inserts the row, under a
per-caller lock (a PostgreSQL advisory lock; SQLite's write lock), so concurrent uploads
by one caller cannot pass it together.
"""

from __future__ import annotations

import hashlib
import logging
import re
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, Float, Index, String, func, select, text
from sqlalchemy.orm import Mapped, Session, mapped_column

from .audio import parse_data_uri, probe_audio
from .catalog import SpeechLimits
from .db import writing
from .errors import InputError, NotFound
from .ids import new_id
from .lifecycle import utcnow
from .ports import ObjectStore
from .schema import Base, UTCDateTime

if TYPE_CHECKING:
    from .accounts import Caller
    from .catalog import ModelEntry
    from .services import Services

log = logging.getLogger("vramq.files")

PURPOSES = ("audio", "batch")
MAX_FILENAME_CHARS = 255


class File(Base):
    """An uploaded file's metadata; its bytes are the object ``files/<id>``."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(MAX_FILENAME_CHARS))
    bytes: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(100))
    sha256: Mapped[str] = mapped_column(String(64))
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Decoded length of an audio file; None for other purposes."""
    caller: Mapped[str | None] = mapped_column(String(80), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_files_created", "created_at"),)

    @property
    def key(self) -> str:
        return object_key(self.id)


def object_key(file_id: str) -> str:
    return f"files/{file_id}"


def delete_object(store: ObjectStore, file_id: str) -> None:
    """Delete a file's bytes; an object already gone is not an error (a retried sweep)."""
    store.delete(object_key(file_id))


def _field_error(field: str, msg: str, code: str | None = None) -> InputError:
    return InputError(f"{field}: {msg}", [{"loc": [field], "msg": msg}], code=code)


def clean_filename(name: str | None) -> str:
    """The last path segment of a client's file name, without control characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:MAX_FILENAME_CHARS] or "upload"


class UploadQuotaExceeded(InputError):
    """Storing a file would take its caller's live uploads past their quota."""

    code = "upload_quota_exceeded"

    def __init__(self, quota: int, used: int, size: int, setting: str):
        self.quota, self.used, self.size, self.setting = quota, used, size, setting
        msg = (
            f"this upload ({size} bytes) would take your stored uploads past the quota of {quota} bytes "
            f"({setting}): {used} bytes are in use; uploads are deleted "
            "VRAMQ_UPLOAD_RETENTION_HOURS after they were made"
        )
        super().__init__(msg, [{"loc": ["file"], "msg": f"at most {quota} bytes of uploads ({setting})"}])


#: First key of the advisory lock (with the caller's hash) that serialises a caller's uploads.
_QUOTA_LOCK = 7224108
#: The default audio limit is the catalog's largest speech limit plus this share, so
#: audio a little past a model's limit is still uploaded and told at submit which
#: model limit it passed.
AUDIO_LIMIT_MARGIN = 1.1


def audio_seconds_limit(services: Services) -> tuple[float, str]:
    """``(seconds, what sets it)``: the longest audio the API probes (uploads, data URIs)."""
    settings = services.settings
    if settings.max_audio_seconds:
        return settings.max_audio_seconds, "VRAMQ_MAX_AUDIO_SECONDS"
    speech = [_speech_limits(e).max_audio_seconds for e in services.catalog if e.kind == "speech"]
    largest = max(speech, default=SpeechLimits().max_audio_seconds)
    return (
        largest * AUDIO_LIMIT_MARGIN,
        "VRAMQ_MAX_AUDIO_SECONDS; by default the largest max_audio_seconds in the catalog plus 10%",
    )


def _speech_limits(entry: ModelEntry) -> SpeechLimits:
    """A speech model's limits (an entry's limits are the class its kind names, catalog.LIMITS)."""
    limits = entry.limit
    assert isinstance(limits, SpeechLimits), f"{entry.id} is a {entry.kind} model"
    return limits


def uploaded_bytes(session: Session, caller: str) -> int:
    """The bytes of ``caller``'s live uploads."""
    return int(
        session.execute(select(func.coalesce(func.sum(File.bytes), 0)).where(File.caller == caller)).scalar_one()
    )


def _hold_quota(session: Session, caller: str, size: int, quota: tuple[int, str]) -> None:
    """In the inserting transaction: lock the caller's uploads, then count them."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k, hashtext(:c))"), {"k": _QUOTA_LOCK, "c": caller})
    used = uploaded_bytes(session, caller)
    if used + size > quota[0]:
        raise UploadQuotaExceeded(quota[0], used, size, quota[1])


def store_file(
    services: Services,
    data: bytes,
    filename: str | None,
    purpose: str,
    caller: str | None,
    quota: tuple[int, str] | None = None,
) -> File:
    """Check ``data`` for its ``purpose``, store it, record it; return the ``File``.

    Raises ``InputError``: a bad purpose (loc ``purpose``), content that is not what the
    purpose needs (loc ``file``; ``invalid_audio`` for audio), or more than
    ``VRAMQ_MAX_UPLOAD_MB`` (code ``payload_too_large``); ``UploadQuotaExceeded`` when
    ``quota`` (``(bytes, setting)``; None or 0 bytes: none) would be passed by ``caller``.
    """
    if purpose not in PURPOSES:
        raise _field_error("purpose", f"must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    limit = services.settings.max_upload_bytes
    if len(data) > limit:
        msg = f"{len(data)} bytes is over the upload limit of {limit} bytes (VRAMQ_MAX_UPLOAD_MB)"
        raise _field_error("file", msg, "payload_too_large")
    duration = None
    if purpose == "audio":
        seconds, setting = audio_seconds_limit(services)
        info = probe_audio(
            data,
            loc=("file",),
            max_seconds=seconds,
            limit_name=setting,
            cpu_budget_s=services.settings.audio_probe_cpu_s,
        )
        content_type, duration = info.content_type, info.duration_s
    else:
        _check_jsonl(data)
        content_type = "application/jsonl"
    row = File(
        id=new_id("file"),
        purpose=purpose,
        filename=clean_filename(filename),
        bytes=len(data),
        content_type=content_type,
        sha256=hashlib.sha256(data).hexdigest(),
        duration_s=duration,
        caller=caller,
        created_at=utcnow(),
    )
    quota = quota if quota and quota[0] and caller is not None else None
    # A first count without the lock: no bytes are stored for a caller already full.
    if quota is not None and caller is not None:
        with services.sessions() as session:
            used = uploaded_bytes(session, caller)
        if used + len(data) > quota[0]:
            raise UploadQuotaExceeded(quota[0], used, len(data), quota[1])
    services.store.put(row.key, data, content_type)
    try:
        with writing(services.sessions) as session:
            if quota is not None and caller is not None:
                _hold_quota(session, caller, len(data), quota)
            session.add(row)
    except Exception:  # the database refused: no row will ever point at the bytes
        _discard_orphan(services.store, row.id)
        raise
    return row


def _discard_orphan(store: ObjectStore, file_id: str) -> None:
    """Delete the bytes of an upload whose row was not written: the sweeper works from
    rows, so an object without one would be kept for ever."""
    try:
        delete_object(store, file_id)
    except Exception as exc:  # the upload fails anyway; say what was left behind
        log.warning(
            "upload %s: the row was not written and its object %s could not be deleted (%s)",
            file_id,
            object_key(file_id),
            exc,
        )


def _check_jsonl(data: bytes) -> None:
    """A batch file: UTF-8 text, one strict JSON object per non-blank line (jobs.strictjson:
    no NaN, no NUL, bounded nesting), at least one and at most a batch's ``MAX_JOBS``."""
    from . import strictjson
    from .batches.parsing import MAX_JOBS

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _field_error("file", f"a batch file must be UTF-8 text (bad byte at offset {exc.start})") from None
    lines = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        lines += 1
        if lines > MAX_JOBS:
            raise _field_error("file", f"more than {MAX_JOBS} lines: a batch holds at most {MAX_JOBS} jobs")
        try:
            value = strictjson.loads(line, ["file", "line", number])
        except ValueError as exc:
            raise _field_error("file", f"line {number} is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise _field_error("file", f"line {number} must be a JSON object")
    if not lines:
        raise _field_error("file", "a batch file needs at least one line (one JSON job object per line)")


def get_file(services: Services, file_id: str) -> File:
    """The file's row; ``NotFound`` if there is none."""
    with services.sessions() as session:
        row = session.get(File, file_id)
    if row is None:
        raise NotFound(f"no file {file_id}")
    return row


def resolve_audio(services: Services, ref: str, *, max_bytes: int | None = None) -> bytes:
    """The audio bytes a speech input names: a ``file_…`` id or a ``data:`` URI.

    ``NotFound`` for a file id with no file (row or object); ``InputError`` for a bad
    data URI. ``max_bytes`` caps a data URI (default: ``VRAMQ_MAX_UPLOAD_MB``).
    """
    if ref.startswith("data:"):
        return parse_data_uri(ref, services.settings.max_upload_bytes if max_bytes is None else max_bytes)
    if not ref.startswith("file_"):
        raise InputError(
            "audio must be a file_… id or a data:audio/…;base64 URI",
            [{"loc": ["input", "audio"], "msg": "must be a file_… id or a data: URI"}],
        )
    row = get_file(services, ref)
    return services.store.get(row.key)


def check_audio_input(services: Services, entry: ModelEntry, inp: dict[str, Any], owner: Caller | None = None) -> float:
    """Submit-time check of a speech job's audio; return its duration in seconds.

    The file must exist and be audio; a data URI is decoded and probed here. Past the
    model's ``max_audio_bytes`` is ``payload_too_large``, past ``max_audio_seconds`` is
    ``audio_too_long``; every error names ``["input", "audio"]``.
    """
    loc = ["input", "audio"]
    ref = inp["audio"]
    limits = _speech_limits(entry)

    def bad(msg: str, code: str = "invalid_input") -> InputError:
        return InputError(f"input.audio: {msg}", [{"loc": loc, "msg": msg}], code=code)

    if ref.startswith("data:"):
        data = parse_data_uri(ref, limits.max_audio_bytes, loc=loc)
        info = probe_audio(
            data,
            loc=loc,
            max_seconds=limits.max_audio_seconds,
            limit_name=f"max_audio_seconds={limits.max_audio_seconds:g} of model {entry.id}",
            cpu_budget_s=services.settings.audio_probe_cpu_s,
        )
        size, duration = len(data), info.duration_s
    else:
        try:
            row = get_file(services, ref)
            if owner is not None and not owner.owns(row.caller):
                raise NotFound(ref)  # another caller's file does not exist for this one
        except NotFound:
            raise bad(f"no file {ref} (upload audio with POST /v1/files, purpose audio)") from None
        if row.purpose != "audio":
            raise bad(f"file {ref} was uploaded with purpose {row.purpose!r}, not 'audio'")
        assert row.duration_s is not None, ref  # an audio upload is stored with its duration (store_file)
        size, duration = row.bytes, row.duration_s
    if size > limits.max_audio_bytes:
        raise bad(
            f"{size} bytes is over the limit max_audio_bytes={limits.max_audio_bytes} of model {entry.id}",
            "payload_too_large",
        )
    if duration > limits.max_audio_seconds:
        limit = f"max_audio_seconds={limits.max_audio_seconds:g}"
        raise bad(f"{duration:g} s of audio is over the limit {limit} of model {entry.id}", "audio_too_long")
    return duration
