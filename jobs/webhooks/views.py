"""Deliveries as the API lists them (``GET /v1/jobs/{id}/deliveries``, ``GET /v1/batches/{id}/deliveries``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..schema import WebhookAttempt, WebhookDelivery
from ..views import iso


def deliveries(session: Session, job_id: str | None = None, batch_id: str | None = None) -> list[dict[str, Any]]:
    """A job's (or a batch's own) deliveries, each with its attempts."""
    which = WebhookDelivery.job_id == job_id if job_id else WebhookDelivery.batch_id == batch_id
    rows = session.execute(select(WebhookDelivery).where(which).order_by(WebhookDelivery.created_at)).scalars().all()
    out: list[dict[str, Any]] = []
    for d in rows:
        attempts = (
            session.execute(
                select(WebhookAttempt).where(WebhookAttempt.delivery_id == d.id).order_by(WebhookAttempt.number)
            )
            .scalars()
            .all()
        )
        out.append(
            {
                "id": d.id,
                "event": d.event,
                "url": d.url,
                "status": d.status,
                "attempts": [
                    {
                        "number": a.number,
                        "at": iso(a.at),
                        "status_code": a.status_code,
                        "error": a.error,
                        "duration_ms": round(a.duration_ms, 1),
                    }
                    for a in attempts
                ],
                "next_attempt_at": iso(d.next_at) if d.status == "pending" else None,
            }
        )
    return out
