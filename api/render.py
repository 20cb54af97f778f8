"""Jobs as the API shows them: signed links minted at read time, times in ISO 8601 UTC."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urljoin

from flask import current_app, request
from sqlalchemy import func, select

from jobs.lifecycle import QUEUED
from jobs.queue import PRIORITY
from jobs.schema import Job


def iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat().replace("+00:00", "Z")


def base_url() -> str:
    public = current_app.config["VRAMQ"].settings.public_url
    return (public or request.host_url.rstrip("/")) + "/"


def signed(key: str) -> str:
    services = current_app.config["VRAMQ"]
    url = services.store.signed_url(key, services.settings.link_ttl)
    return url if "://" in url else urljoin(base_url(), url.lstrip("/"))


def render_output(value: Any) -> Any:
    """Replace every ``{"$object": key}`` with a signed link to that object."""
    if isinstance(value, dict):
        if set(value) == {"$object"}:
            return signed(value["$object"])
        return {k: render_output(v) for k, v in value.items()}
    if isinstance(value, list):
        return [render_output(v) for v in value]
    return value


def queue_position(session, job: Job) -> int | None:
    """Jobs of the same model that a worker takes before this one (0 = next)."""
    if job.status != QUEUED:
        return None
    ahead_priorities = [p for p, rank in PRIORITY.items() if rank < PRIORITY[job.priority]]
    q = select(func.count()).select_from(Job).where(
        Job.model == job.model,
        Job.status == QUEUED,
        (Job.priority.in_(ahead_priorities)) | ((Job.priority == job.priority) & (Job.created_at < job.created_at)),
    )
    return session.execute(q).scalar_one()


def render_job(job: Job, session=None) -> dict[str, Any]:
    base = base_url()
    self_url = urljoin(base, f"v1/jobs/{job.id}")
    error = {"code": job.error_code, "message": job.error_message} if job.error_code else None
    return {
        "id": job.id,
        "object": "job",
        "model": job.model,
        "kind": job.kind,
        "status": job.status,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "progress": round(job.progress, 4),
        "queue_position": queue_position(session, job) if session is not None else None,
        "input": job.input,
        "metadata": job.meta,
        "batch_id": job.batch_id,
        "priority": job.priority,
        "output": None if job.output is None or job.outputs_expired_at else render_output(job.output),
        "error": error,
        "attempts": job.attempts,
        "usage": {
            "gpu_seconds": round(job.gpu_seconds, 6),
            "tokens_reserved": job.tokens_reserved,
            "tokens_charged": job.tokens_charged,
            **job.usage_detail,
        },
        "saved": job.saved,
        "expires_at": None if job.saved else iso(job.expires_at),
        "outputs_expired": job.outputs_expired_at is not None,
        "links": {"self": self_url, "cancel": self_url + "/cancel", "events": self_url + "/events"},
    }
