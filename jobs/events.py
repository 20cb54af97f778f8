"""Each job's events, as a Redis stream: ``status``, ``progress``, ``delta`` (text), ``done``.

Workers and the API append; ``GET /v1/jobs/{id}/events`` replays the stream and follows
it. Stream entry ids are the SSE event ids, so a client that reconnects with
``Last-Event-ID`` resumes exactly after the last event it saw. A stream lives for a day
after its last event; the job row stays the record of truth after that.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger("vramq.events")

PREFIX = "vramq:events:"
TTL_S = 24 * 3600
MAXLEN = 50_000  # a very long generation keeps its newest events

Event = tuple[str, str, dict[str, Any]]
"""``(job id or stream entry id, event, data)``."""


def key(job_id: str) -> str:
    return PREFIX + job_id


def emit(redis: Redis, job_id: str, event: str, data: dict[str, Any]) -> None:
    """Append one event (a round trip; use ``EventWriter`` on hot paths)."""
    pipe = redis.pipeline(transaction=False)
    pipe.xadd(key(job_id), {"event": event, "data": json.dumps(data)}, maxlen=MAXLEN, approximate=True)
    pipe.expire(key(job_id), TTL_S)
    pipe.execute()


def read(redis: Redis, job_id: str, after: str = "0", block_ms: int | None = None) -> list[Event]:
    """Events after the stream id ``after``: ``[(id, event, data), …]``."""
    # ``[[stream, [(entry id, fields), …]], …]``: the RESP2 answer (vramq's clients speak
    # RESP2; the annotation also allows RESP3's mapping).
    answer = cast("list[list[Any]]", redis.xread({key(job_id): after}, count=500, block=block_ms))
    out: list[Event] = []
    for _stream, entries in answer or []:
        for entry_id, fields in entries:
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            ev = fields.get(b"event", fields.get("event"))
            data = fields.get(b"data", fields.get("data"))
            out.append((entry_id, ev.decode() if isinstance(ev, bytes) else ev, json.loads(data)))
    return out


class EventWriter:
    """Appends events from a background thread, so token streams never wait on Redis.

    Events of one job keep their order (one queue, one writer). If Redis is down the
    events are dropped with a warning: they are a live view, the job row is the record.
    """

    def __init__(self, redis: Redis):
        self.redis = redis
        self._q: queue.Queue[Event | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="event-writer", daemon=True)
        self._thread.start()

    def put(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        self._q.put((job_id, event, data))

    def close(self, timeout: float = 5) -> None:
        self._q.put(None)
        self._thread.join(timeout)

    def _drain(self) -> Iterator[Event | None]:
        yield self._q.get()
        while True:
            try:
                yield self._q.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        while True:
            drained = list(self._drain())
            stop = None in drained
            batch = _coalesce([b for b in drained if b is not None])
            if batch:
                try:
                    pipe = self.redis.pipeline(transaction=False)
                    for job_id, event, data in batch:
                        pipe.xadd(
                            key(job_id), {"event": event, "data": json.dumps(data)}, maxlen=MAXLEN, approximate=True
                        )
                    for job_id in {b[0] for b in batch}:
                        pipe.expire(key(job_id), TTL_S)
                    pipe.execute()
                except Exception as exc:  # a live view only; never fail a job over it
                    log.warning("dropped %d job events: %s", len(batch), exc)
            if stop:
                return


def _coalesce(batch: list[Event]) -> list[Event]:
    """Merge a job's consecutive ``delta`` events into one (same text, far fewer writes).

    Under load tokens arrive faster than one write each; joined, the deltas are unchanged.
    """
    out: list[Event] = []
    for job_id, event, data in batch:
        if event == "delta" and out and out[-1][0] == job_id and out[-1][1] == "delta":
            out[-1] = (job_id, "delta", {"text": out[-1][2]["text"] + data["text"]})
        else:
            out.append((job_id, event, data))
    return out
