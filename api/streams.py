"""Caps on open event streams (``GET /v1/jobs/<id>/events``, ``/v1/batches/<id>/events``).

A stream holds one of its API process's threads for as long as it is open (at most
``VRAMQ_STREAM_SECONDS``), so streams are counted in the process: at most
``VRAMQ_MAX_STREAMS_PER_CALLER`` per caller (an API key, an anonymous network) and
``VRAMQ_MAX_STREAMS`` in all (default: half the process's threads, so the other half
always answers everything else). Past either cap: 429 with ``Retry-After``. The counts
are per API process: with N processes a caller may hold up to N times its cap.
"""

from __future__ import annotations

import threading

from vramq.jobs.errors import RateLimited

#: Threads per API process when the app is not served by ``api.server`` (tests, ``flask run``).
DEFAULT_THREADS = 8
#: Seconds a refused client is told to wait (a stream ends at least this often somewhere).
RETRY_AFTER_S = 5


class StreamSlots:
    """Open streams, per caller and in total, in this process."""

    def __init__(self, per_caller: int, total: int):
        self.per_caller = per_caller
        self.total = max(1, total)
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._count = 0

    def acquire(self, caller: str):
        """Take a slot for ``caller`` (429 past a cap); returns the function that gives it back."""
        with self._lock:
            if self._open.get(caller, 0) >= self.per_caller:
                raise RateLimited(
                    f"at most {self.per_caller} event streams open at once per caller on this API "
                    "process (VRAMQ_MAX_STREAMS_PER_CALLER); close one, or poll the job",
                    retry_after=RETRY_AFTER_S,
                )
            if self._count >= self.total:
                raise RateLimited(
                    f"this API process has {self.total} event streams open, its most "
                    "(VRAMQ_MAX_STREAMS); try again shortly, or poll the job",
                    retry_after=RETRY_AFTER_S,
                )
            self._open[caller] = self._open.get(caller, 0) + 1
            self._count += 1
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                left = self._open.get(caller, 0) - 1
                if left > 0:
                    self._open[caller] = left
                else:
                    self._open.pop(caller, None)
                self._count -= 1

        return release

    def open_count(self) -> int:
        with self._lock:
            return self._count


def slots_for(settings, threads: int = DEFAULT_THREADS) -> StreamSlots:
    return StreamSlots(settings.max_streams_per_caller, settings.max_streams or max(1, threads // 2))
