"""Workers announce themselves in Redis; a key that is not renewed expires with its worker."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from redis import Redis

PREFIX = "vramq:workers:"
TTL_S = 15


class ModelStats(TypedDict):
    """One model's residency on the worker so far."""

    loads: int
    evictions: int
    load_seconds: float


class VramFigures(TypedDict):
    budget_bytes: int | None
    """The card's memory the worker may use (None on the CPU)."""
    estimated_bytes: int
    """The estimates of its resident models, summed."""
    measured_bytes: int | None
    """What the device reports in use (NVML; the process's resident set on the CPU)."""


class WorkerBeat(TypedDict, total=False):
    """What a worker announces every ``TTL_S / 3`` seconds (``WorkerRuntime.describe``):
    admission reads ``state``, ``models`` and ``failed_models``; ``/v1/workers`` shows it
    whole; the metrics read ``vram``, ``resident`` and ``models_stats``."""

    name: str
    card: str
    """``card<N>`` or ``cpu``."""
    models: list[str]
    """The models it serves, resident or loaded on demand."""
    failed_models: dict[str, str]
    """Models it tried and failed to load, with the reason (in their cool-down)."""
    pid: int
    host: str
    state: str
    """``loading``, ``ready`` or ``stopping``."""
    running: int
    resident: list[str]
    models_stats: dict[str, ModelStats]
    need_bytes: dict[str, int]
    vram: VramFigures


def announce(redis: Redis, name: str, info: WorkerBeat) -> None:
    redis.set(PREFIX + name, json.dumps(info), ex=TTL_S)


def live_workers(redis: Redis) -> list[WorkerBeat]:
    """Workers that announced themselves within the last ``TTL_S`` seconds."""
    out: list[WorkerBeat] = []
    for key in redis.scan_iter(PREFIX + "*"):
        raw = redis.get(key)
        if raw:
            out.append(json.loads(raw))
    return out


def withdraw(redis: Redis, name: str) -> None:
    redis.delete(PREFIX + name)


def served_by(workers: Iterable[WorkerBeat]) -> set[str]:
    """Models at least one of ``workers`` serves (loading or ready, resident or on demand),
    leaving out those a worker tried and failed to load (``failed_models``)."""
    return {
        m
        for w in workers
        if w.get("state") in ("loading", "ready")
        for m in w.get("models", [])
        if m not in w.get("failed_models", {})
    }


def served_models(redis: Redis) -> set[str]:
    """Models at least one live worker serves."""
    return served_by(live_workers(redis))


class ServedModels:
    """``served_models`` read at most once per ``ttl_s`` per process (the submit path asks
    on every request; a worker that just died still counts until its key expires)."""

    def __init__(self, redis: Redis, ttl_s: float = 1.0):
        self.redis, self.ttl_s = redis, ttl_s
        self._value: set[str] = set()
        self._at = float("-inf")
        self._lock = threading.Lock()

    def get(self) -> set[str]:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl_s:
                self._value = served_models(self.redis)
                self._at = time.monotonic()
            return self._value
