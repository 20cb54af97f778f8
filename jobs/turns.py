"""Turns that went missing are published again, so no queued job waits forever.

Every queued job publishes one turn (jobs.queue), and while nothing goes wrong there are
never fewer turns than queued jobs. Turns can still be lost: a Redis restarted without
its append-only file, a turn published after a commit whose broker call failed (a
requeue), a broker flushed by hand. The job rows in SQL are the record, so they say
what is missing: per model and priority, the queued jobs minus the turns waiting in
Redis. A deficit seen on two checks in a row (turns in flight, being taken by a worker,
are missing from Redis only for that instant) is published again.

An extra turn costs a worker a few milliseconds (it finds nothing, or takes the next job
of that model); a missing one strands a job. So the check errs towards publishing: a
worker holding prefetched turns while its threads are busy can cause a few extra.

Workers run the check (one at a time, through a Redis lock) every ``CHECK_S`` seconds.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .lifecycle import QUEUED
from .priorities import Priority
from .queue import PRIORITY, publish, queue_name
from .schema import Job

if TYPE_CHECKING:
    from redis import Redis

    from .services import Services

log = logging.getLogger("vramq.turns")

CHECK_S = 10.0
LOCK = "vramq:turns:lock"
#: kombu's Redis transport keeps one list per priority step: ``<queue>\x06\x16<step>``.
_SEP = "\x06\x16"


def waiting(redis: Redis, model: str, priority: Priority) -> int:
    """Turns for ``model``/``priority`` waiting in Redis (not yet delivered to a worker)."""
    step = PRIORITY[priority]
    key = queue_name(model) + (f"{_SEP}{step}" if step else "")
    return int(redis.llen(key))


def queued(session: Session) -> dict[tuple[str, Priority], tuple[int, str]]:
    """``(model, priority) -> (queued jobs, the oldest one's id)``."""
    rows = session.execute(
        select(Job.model, Job.priority, func.count(), func.min(Job.id))
        .where(Job.status == QUEUED)
        .group_by(Job.model, Job.priority)
    )
    return {(m, p): (n, oldest) for m, p, n, oldest in rows}


class Reconciler:
    """Tops up the turns of each model and priority (see the module docstring)."""

    def __init__(self, services: Services):
        self.services = services
        self._previous: dict[tuple[str, Priority], int] = {}

    def deficits(self) -> dict[tuple[str, Priority], tuple[int, str]]:
        redis = self.services.redis
        with self.services.sessions() as session:
            counts = queued(session)
        return {
            k: (n - waiting(redis, *k), oldest) for k, (n, oldest) in counts.items() if PRIORITY.get(k[1]) is not None
        }

    def tick(self) -> int:
        """Compare, and publish what was missing on this check and the one before; return
        how many turns were published."""
        previous: dict[tuple[str, Priority], int] = {}
        published = 0
        for key, (missing, oldest) in self.deficits().items():
            confirmed = min(missing, self._previous.get(key, 0))
            if confirmed > 0:
                model, priority = key
                publish(self.services.celery, oldest, model, priority, count=confirmed)
                published += confirmed
                log.warning(
                    "%d queued %s jobs at %s had no turn waiting; published %d again",
                    missing,
                    model,
                    priority,
                    confirmed,
                )
            if missing - confirmed > 0:
                previous[key] = missing - confirmed
        self._previous = previous
        return published

    def tick_if_turn(self) -> int:
        """``tick``, by one process at a time across the installation (a Redis lock that
        lapses by itself, so a dead holder does not stop the checks)."""
        if not self.services.redis.set(LOCK, "1", nx=True, ex=int(CHECK_S * 0.9) or 1):
            return 0
        return self.tick()
