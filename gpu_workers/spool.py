"""Outputs the object store would not take, kept on the worker's disk and retried.

A job whose model has run holds paid GPU work. If the store is down when its outputs
are written, the outputs are spooled under ``<data_dir>/spool/<worker>/<job>/`` (files
on disk, not memory) and one background thread retries each job's upload with
exponential backoff (``first_backoff_s`` doubling to ``max_backoff_s``). Meanwhile the
job stays ``running`` under the worker's lease, which the worker keeps renewing:

- when every output has landed, ``on_stored(keys)`` records the success as usual;
- after ``VRAMQ_SPOOL_SECONDS`` (default 1 h) of failures, or when the spool would grow
  past ``VRAMQ_SPOOL_MAX_MB``, ``on_give_up(reason)`` fails the job
  ``storage_unavailable`` (refunded);
- if the worker dies meanwhile, the spool dies with it: the lease lapses and the job
  runs again elsewhere (the GPU work is lost, the job is not). A worker clears its own
  spool folder at start.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vramq.jobs.ports import ObjectStore

from .backends.base import Artifact

log = logging.getLogger("vramq.spool")


@dataclass
class _Held:
    job_id: str
    prefix: str
    folder: Path
    files: list[tuple[str, str]]
    """``(name, content type)`` of each artifact, in the order they were produced."""
    on_stored: Callable[[dict[str, str]], None]
    on_give_up: Callable[[str], None]
    deadline: float
    next_at: float
    backoff_s: float
    attempts: int = 0
    last_error: str = ""


@dataclass
class Spool:
    directory: Path
    store: ObjectStore
    max_seconds: float = 3600.0
    max_bytes: int = 10 * 1024**3
    first_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _held: dict[str, _Held] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Spool:
        """Clear what a previous process of this worker left (its jobs ran again), then retry."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="spool", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[str]:
        """Stop retrying; return the ids of the jobs still held (the caller gives them back)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            held = list(self._held)
            self._held.clear()
        shutil.rmtree(self.directory, ignore_errors=True)
        return held

    @property
    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())

    def hold(
        self,
        job_id: str,
        prefix: str,
        artifacts: list[Artifact],
        error: str,
        on_stored: Callable[[dict[str, str]], None],
        on_give_up: Callable[[str], None],
    ) -> None:
        """Keep ``artifacts`` (``backends.base.Artifact``) on disk and store them under ``prefix``
        when the store answers again. ``error``: why the first try failed."""
        size = sum(len(a.data) for a in artifacts)
        if self.used_bytes() + size > self.max_bytes:
            on_give_up(
                f"the store is unavailable ({error}) and the worker's spool is full "
                f"({self.max_bytes // 2**20} MB, VRAMQ_SPOOL_MAX_MB)"
            )
            return
        folder = self.directory / job_id
        folder.mkdir(parents=True, exist_ok=True)
        for i, art in enumerate(artifacts):
            (folder / str(i)).write_bytes(art.data)
        now = self.clock()
        held = _Held(
            job_id,
            prefix,
            folder,
            [(a.name, a.content_type) for a in artifacts],
            on_stored,
            on_give_up,
            deadline=now + self.max_seconds,
            next_at=now + self.first_backoff_s,
            backoff_s=self.first_backoff_s,
            attempts=1,
            last_error=error,
        )
        with self._lock:
            self._held[job_id] = held
        log.warning(
            "store unavailable for the outputs of %s (%s); spooled %d bytes, retrying for up to %.0fs",
            job_id,
            error,
            size,
            self.max_seconds,
        )
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            self.retry_due()

    def retry_due(self) -> int:
        """Try every held job whose backoff has passed; return how many landed."""
        now = self.clock()
        with self._lock:
            due = [h for h in self._held.values() if h.next_at <= now]
        landed = 0
        for held in due:
            if self._stop.is_set():
                break
            landed += self._try(held)
        return landed

    def _try(self, held: _Held) -> int:
        try:
            keys = {}
            for i, (name, content_type) in enumerate(held.files):
                key = held.prefix + name
                self.store.put(key, (held.folder / str(i)).read_bytes(), content_type)
                keys[name] = key
        except Exception as exc:  # still down: back off, or give up past the deadline
            held.attempts += 1
            held.last_error = str(exc)
            if self.clock() >= held.deadline:
                reason = (
                    f"the store was unavailable for {self.max_seconds:.0f}s "
                    f"({held.attempts} tries; last: {held.last_error})"
                )
                self._finish(held, held.on_give_up, reason)
            else:
                self._back_off(held)
            return 0
        if self._finish(held, held.on_stored, keys):
            log.info("spooled outputs of %s stored after %d tries", held.job_id, held.attempts + 1)
            return 1
        return 0

    def _finish(self, held: _Held, callback, arg) -> bool:
        """Record the outcome; if that fails (the database is down too), keep the job and
        try again later: storing the same keys again is harmless."""
        try:
            callback(arg)
        except Exception:
            log.exception("recording the outcome of spooled job %s failed; retrying", held.job_id)
            self._back_off(held)
            return False
        self._forget(held)
        return True

    def _back_off(self, held: _Held) -> None:
        held.backoff_s = min(held.backoff_s * 2, self.max_backoff_s)
        held.next_at = self.clock() + held.backoff_s

    def _forget(self, held: _Held) -> None:
        with self._lock:
            self._held.pop(held.job_id, None)
        shutil.rmtree(held.folder, ignore_errors=True)
