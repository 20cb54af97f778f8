"""Server-sent event streams: frames, the response (one of the caller's stream slots),
how long a stream stays open, and where a reconnecting client resumes."""

from __future__ import annotations

import json
import re

from flask import Response, current_app, request, stream_with_context

from vramq.jobs.errors import InputError

from .callers import current_caller

#: A Redis stream id, as the events stream hands them out: ``<ms>-<seq>`` (or ``<ms>``).
_STREAM_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
_U64_MAX = 2**64 - 1


def last_event_id() -> str:
    """Where an event stream resumes: ``Last-Event-ID`` (or ``?last_event_id=``), an id
    this stream gave out; ``"0"`` (from the start) when neither is given. 422 otherwise."""
    header = request.headers.get("Last-Event-ID")
    raw, loc = (
        (header, ["header", "Last-Event-ID"])
        if header
        else (request.args.get("last_event_id"), ["query", "last_event_id"])
    )
    if not raw:
        return "0"
    m = _STREAM_ID.fullmatch(raw.strip())
    if m is None or any(int(part) > _U64_MAX for part in m.groups() if part is not None):
        msg = "must be the id of an event this stream sent (like 1718000000000-0)"
        raise InputError(f"{loc[1]}: {msg}", [{"loc": loc, "msg": msg}])
    return raw.strip()


def sse_frame(event: str, data: dict, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


def sse_response(stream) -> Response:
    """A server-sent event stream; proxies are told not to buffer it. It takes one of the
    caller's stream slots (api.streams: 429 past the caps) until it is closed."""
    release = current_app.extensions["vramq.streams"].acquire(current_caller().id)
    try:
        resp = Response(
            stream_with_context(stream),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    except BaseException:
        release()
        raise
    resp.call_on_close(release)
    return resp


def stream_seconds() -> float:
    """How long an event stream stays open (VRAMQ_STREAM_SECONDS); clients resume with Last-Event-ID."""
    return current_app.config["VRAMQ"].settings.stream_s
