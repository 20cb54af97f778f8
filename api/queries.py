"""Query parameters the list endpoints share: ``status``, ``limit`` and history cursors."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime

from flask import request

from vramq.jobs.errors import InputError
from vramq.jobs.lifecycle import CANCELED, FAILED, QUEUED, RUNNING, SUCCEEDED

STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)
"""A job's statuses, as ``?status=`` takes them."""


def bad_arg(name: str, msg: str) -> InputError:
    """422 naming the query parameter ``name``."""
    return InputError(f"query parameter {name}: {msg}", [{"loc": ["query", name], "msg": msg}])


def statuses_arg() -> list[str] | None:
    """``?status=a,b``: the statuses asked for (422 for an unknown one), or None."""
    if not request.args.get("status"):
        return None
    wanted = request.args["status"].split(",")
    bad = [w for w in wanted if w not in STATUSES]
    if bad:
        raise bad_arg("status", f"unknown status {bad[0]!r}; one or more of {', '.join(STATUSES)}")
    return wanted


KINDS = ("text", "image", "video", "speech")
"""The models' kinds, as ``?kind=`` takes them."""


def kind_arg() -> str:
    """``?kind=``: one of ``KINDS`` (422 otherwise)."""
    kind = request.args["kind"]
    if kind not in KINDS:
        raise bad_arg("kind", f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    return kind


def limit_arg(maximum: int, default: int) -> int:
    """``?limit=``: a page size from 1 to ``maximum`` (422 otherwise), in plain digits."""
    raw = request.args.get("limit")
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,18}", raw.strip()):
        raise bad_arg("limit", f"must be an integer from 1 to {maximum}")
    limit = int(raw)
    if not 1 <= limit <= maximum:
        raise bad_arg("limit", f"must be from 1 to {maximum}")
    return limit


def encode_cursor(row) -> str:
    """The cursor after ``row`` (a job or batch) in a newest-first history: its
    ``created_at`` and id."""
    raw = json.dumps([row.created_at.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_CURSOR_ID = re.compile(r"[a-z]{1,10}_[0-9a-z]{1,40}")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """``(created_at, id)`` of a cursor ``encode_cursor`` gave out; 422 for anything else."""
    try:
        created, last_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        when = datetime.fromisoformat(created)
        if when.tzinfo is not None:
            when = when.astimezone(UTC)  # OverflowError past year 9999
        if when.tzinfo is None or not isinstance(last_id, str) or not _CURSOR_ID.fullmatch(last_id):
            raise ValueError("not a cursor of ours")
        return when, last_id
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise bad_arg("cursor", "is not a cursor this server gave out (use next_cursor as is)") from None
