"""The outbox: a delivery row written in the transaction that records the event, so a
crash between the two cannot lose it and nothing a worker does waits on a receiver."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from ..ids import new_id
from ..lifecycle import utcnow
from ..schema import Job, WebhookDelivery
from ..views import iso
from .signing import secret_for
from .spec import BATCH_EVENTS, JOB_EVENTS

if TYPE_CHECKING:
    from ..schema import Batch
    from ..services import Services

JobJson = Callable[[Job], dict[str, Any]]


def enqueue(
    session: Session,
    job_id: str,
    event: str,
    job_json: JobJson,
    now: datetime | None = None,
    *,
    job: Job | None = None,
) -> str | None:
    """Write the delivery of ``event`` for a job that asked for it, in the caller's
    transaction. ``job_json(job)`` gives the job's JSON. Returns the delivery id.
    ``job``: the job's row as this transaction left it, if the caller has it (else read)."""
    if job is None:
        job = session.get(Job, job_id, populate_existing=True)  # as this transaction left it
    if job is None or not job.webhook or event not in job.webhook.get("events", JOB_EVENTS):
        return None
    return write(session, job.caller or "", job.webhook["url"], event, job_json(job), now, job_id=job.id)


def enqueue_batch(
    session: Session, batch: Batch, event: str, data: dict[str, Any], now: datetime | None = None
) -> str | None:
    """Write the delivery of a batch ``event`` (``data``: the batch's JSON), if it asked."""
    if not batch.webhook or event not in batch.webhook.get("events", BATCH_EVENTS):
        return None
    return write(session, batch.caller, batch.webhook["url"], event, data, now, batch_id=batch.id)


def write(
    session: Session,
    caller: str,
    url: str,
    event: str,
    data: dict[str, Any],
    now: datetime | None,
    *,
    job_id: str | None = None,
    batch_id: str | None = None,
) -> str:
    """Write one delivery row: the signed body is fixed now. Returns its id."""
    now = now or utcnow()
    secret_for(session, caller)  # exists before the first attempt signs with it
    delivery_id = new_id("msg")
    payload = json.dumps({"type": event, "timestamp": iso(now), "data": data}, separators=(",", ":"))
    session.add(
        WebhookDelivery(
            id=delivery_id,
            caller=caller,
            job_id=job_id,
            batch_id=batch_id,
            event=event,
            url=url,
            payload=payload,
            status="pending",
            attempts=0,
            next_at=now,
            created_at=now,
        )
    )
    return delivery_id


def job_json_for(services: Services) -> JobJson:
    """``job_json`` for ``enqueue`` outside a request: links point at ``VRAMQ_PUBLIC_URL``
    (relative without it, for the local store; S3 links are absolute anyway)."""
    from ..views import Links, job_json

    links = Links(services.store, services.settings.link_ttl, services.settings.public_url or "")
    return lambda job: job_json(job, links)
