"""Jobs as the API shows them: signed links minted at read time, times in ISO 8601 UTC."""

from __future__ import annotations

from typing import Any

from flask import current_app, request
from sqlalchemy import func, select

from jobs.lifecycle import QUEUED
from jobs.queue import PRIORITY
from jobs.schema import Job
from jobs.views import Links, job_json


def base_url() -> str:
    public = current_app.config["VRAMQ"].settings.public_url
    return (public or request.host_url.rstrip("/")) + "/"


def links() -> Links:
    services = current_app.config["VRAMQ"]
    return Links(services.store, services.settings.link_ttl, base_url())


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
    """The job as the API shows it (``queue_position`` needs a session)."""
    return job_json(job, links(), (lambda j: queue_position(session, j)) if session is not None else (lambda j: None))
