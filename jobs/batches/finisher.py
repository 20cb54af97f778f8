"""Finishing batches: once none of a batch's jobs is queued or running, its manifest is
written, it is marked finished and ``batch.completed`` is announced. Run by the
``vramq webhooks-and-batches`` dispatcher (``Finisher.tick`` every round)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from sqlalchemy import case, exists, select, update
from sqlalchemy.orm import Session

from ..db import rowcount
from ..lifecycle import QUEUED, RUNNING, utcnow
from ..schema import Batch, Job
from ..views import Links
from ..webhooks import outbox
from .manifest import MANIFEST_MAX_LINK_S, manifest
from .views import OPEN, batch_json, summary

if TYPE_CHECKING:
    from ..services import Services

log = logging.getLogger("vramq.batches")


def due(session: Session, limit: int = 20) -> list[str]:
    """Batches not yet finalized none of whose jobs is queued or running."""
    unfinished = exists().where(Job.batch_id == Batch.id, Job.status.in_((QUEUED, RUNNING)))
    return list(
        session.execute(
            select(Batch.id).where(Batch.finished_at.is_(None), ~unfinished).order_by(Batch.created_at).limit(limit)
        ).scalars()
    )


def finalize(services: Services, batch_id: str) -> bool:
    """Write the manifest of a batch whose jobs have all ended, mark it finished, and
    announce ``batch.completed``. True if this call finished it (several dispatchers may
    race: the manifest is written the same by each, the status only once).

    Links point at ``VRAMQ_PUBLIC_URL``, else at the address the batch was submitted to;
    those inside the manifest last as long as the outputs are kept (at most 7 days)."""
    settings = services.settings
    with services.sessions() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.finished_at is not None:
            return False
        base = settings.public_url or batch.base_url or ""
        links = Links(services.store, settings.link_ttl, base)
        # Whole seconds: retention_hours is a float when set in the environment, and
        # the store signs links for an int number of seconds only.
        manifest_links = Links(
            services.store, int(min(max(settings.link_ttl, settings.retention_hours * 3600), MANIFEST_MAX_LINK_S)), base
        )
        data = manifest(session, batch, manifest_links)
    key = f"batches/{batch_id}/results.jsonl"
    services.store.put(key, data, "application/jsonl")
    now = utcnow()
    with services.sessions.begin() as session:
        won = rowcount(
            session.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.finished_at.is_(None))
                .values(
                    finished_at=now,
                    results_key=key,
                    status=case((Batch.status == OPEN, "completed"), else_=Batch.status),
                )
            )
        )
        if won:
            batch = session.get(Batch, batch_id, populate_existing=True)
            assert batch is not None  # the row this transaction has just updated
            outbox.enqueue_batch(
                session, batch, "batch.completed", batch_json(batch, summary(session, batch_id), links), now
            )
    if won:
        log.info("batch %s finished: %d jobs, results at %s", batch_id, batch.total, key)
    return bool(won)


class Finisher:
    """Finalizes due batches, at most once a second; a batch whose manifest could not be
    written (storage down) is tried again after ``retry_s``."""

    def __init__(self, services: Services, every_s: float = 1.0, retry_s: float = 30.0):
        self.services, self.every_s, self.retry_s = services, every_s, retry_s
        self._next = 0.0
        self._failed: dict[str, float] = {}

    def tick(self) -> int:
        now = time.monotonic()
        if now < self._next:
            return 0
        self._next = now + self.every_s
        with self.services.sessions() as session:
            ids = [b for b in due(session) if self._failed.get(b, 0) <= now]
        done = 0
        for batch_id in ids:
            try:
                done += finalize(self.services, batch_id)
                self._failed.pop(batch_id, None)
            except Exception:  # storage down: the batch stays due
                log.exception("batch %s: writing the results failed; retrying in %g s", batch_id, self.retry_s)
                self._failed[batch_id] = now + self.retry_s
        return done
