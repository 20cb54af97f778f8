"""A batch as the API and ``batch.completed`` show it: counts and usage from its jobs,
its status, and its jobs page by page."""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..lifecycle import CANCELED, FAILED, QUEUED, RUNNING, SUCCEEDED
from ..schema import Batch, Job
from ..views import Links, iso

OPEN = QUEUED
"""The stored status of a batch that has not finished (shown as queued or running)."""


def summary(session: Session, batch_id: str) -> dict[str, Any]:
    """Counts by status and the usage so far, from the batch's jobs (one query)."""
    rows = session.execute(
        select(
            Job.status,
            func.count(),
            func.coalesce(func.sum(Job.gpu_seconds), 0.0),
            func.coalesce(func.sum(Job.tokens_charged), 0),
            func.coalesce(func.sum(Job.tokens_reserved), 0),
        )
        .where(Job.batch_id == batch_id)
        .group_by(Job.status)
    ).all()
    counts = {s: 0 for s in (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)}
    gpu: float = 0
    charged = reserved = 0
    for status, n, g, c, r in rows:
        counts[status] = n
        gpu, charged, reserved = gpu + g, charged + c, reserved + r
    counts["total"] = sum(counts.values())
    return {
        "counts": counts,
        "usage": {
            "gpu_seconds": round(float(gpu), 6),
            "tokens_charged": int(charged),
            "tokens_reserved": int(reserved),
        },
    }


def status_of(batch: Batch, counts: dict[str, int]) -> str:
    if batch.status != OPEN:
        return batch.status
    return QUEUED if counts[QUEUED] == counts["total"] else RUNNING


def batch_json(batch: Batch, summary_: dict[str, Any], links: Links) -> dict[str, Any]:
    self_url = urljoin(links.base, f"v1/batches/{batch.id}")
    return {
        "id": batch.id,
        "object": "batch",
        "status": status_of(batch, summary_["counts"]),
        "priority": batch.priority,
        "counts": summary_["counts"],
        "results_url": links.signed(batch.results_key) if batch.results_key else None,
        "created_at": iso(batch.created_at),
        "canceled_at": iso(batch.canceled_at),
        "finished_at": iso(batch.finished_at),
        "usage": summary_["usage"],
        "metadata": batch.meta,
        "input_file": batch.input_file,
        "links": {
            "self": self_url,
            "jobs": self_url + "/jobs",
            "cancel": self_url + "/cancel",
            "events": self_url + "/events",
        },
    }


def page(
    session: Session, batch_id: str, after: str | None, limit: int, statuses: list[str] | None = None
) -> list[Job]:
    """The batch's jobs in submission order (job ids sort by it), after job id ``after``."""
    q = select(Job).where(Job.batch_id == batch_id)
    if after:
        q = q.where(Job.id > after)
    if statuses:
        q = q.where(Job.status.in_(statuses))
    return list(session.execute(q.order_by(Job.id).limit(limit)).scalars())
