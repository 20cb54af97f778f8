"""Canceling a batch: its queued jobs canceled and refunded in bulk, its running ones
canceled (their workers stop between steps) and charged their minimum."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from .. import outcomes
from ..db import rowcount
from ..errors import Conflict, NotFound
from ..lifecycle import CANCELED, QUEUED, RUNNING
from ..schema import Batch, Job
from .views import OPEN

if TYPE_CHECKING:
    from ..services import Services


def cancel(
    services: Services,
    batch_id: str,
    now: datetime | None = None,
    job_json: Callable[[Job], dict[str, Any]] | None = None,
) -> dict[str, int]:
    """Cancel the batch: queued jobs canceled and refunded, running ones canceled (their
    workers stop between steps) and charged their minimum. Conflict if it had finished.
    Returns ``{"queued": n, "running": n}``, the jobs canceled from each state."""
    now = now or services.now()
    with services.sessions.begin() as session:
        won = rowcount(
            session.execute(
                update(Batch).where(Batch.id == batch_id, Batch.status == OPEN).values(status=CANCELED, canceled_at=now)
            )
        )
        if not won:
            status = session.execute(select(Batch.status).where(Batch.id == batch_id)).scalar()
            if status is None:
                raise NotFound(f"no batch {batch_id}")
            raise Conflict(f"batch {batch_id} already {status}")
        ending = outcomes.end(
            session,
            outcomes.Canceled(),
            where=Job.batch_id == batch_id,
            allowances=services.allowances,
            job_json=job_json,
            now=now,
        )
    canceled = ending.ids(CANCELED)
    running = ending.canceled_running
    # Event streams: the running jobs' followers hear it now (their workers stop between
    # steps); a queued job's stream is only read while it is followed, so they are
    # announced only up to a bound, not 10,000 round trips in the request.
    if len(canceled) > 1000:
        keep = set(running)
        ending.events = [e for e in ending.events if e[0] in keep]
    ending.announce(services.redis)
    return {QUEUED: len(canceled) - len(running), RUNNING: len(running)}
