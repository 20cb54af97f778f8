"""The API's JSON of its resources, in a request: where links point (``base_url``,
``links``), a queued job's position and ETA, and ``job_json``. Signed links are minted at
read time, times are ISO 8601 UTC."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from flask import current_app, request
from sqlalchemy import select

from vramq.jobs import fairness
from vramq.jobs import views as domain_views
from vramq.jobs.lifecycle import FAILED, SUCCEEDED, utcnow
from vramq.jobs.schema import Job
from vramq.jobs.views import Links


def base_url() -> str:
    public = current_app.config["VRAMQ"].settings.public_url
    return (public or request.host_url.rstrip("/")) + "/"


def links() -> Links:
    services = current_app.config["VRAMQ"]
    return Links(services.store, services.settings.link_ttl, base_url())


THROUGHPUT_WINDOW = 50
"""ETA: the model's throughput is measured over its last this-many finished jobs…"""
THROUGHPUT_MAX_AGE_S = 3600
"""…that finished within the last hour (an idle model has no ETA: no recent evidence)."""
_throughput: dict[tuple[str, str], tuple[float, float | None]] = {}


def throughput(session, model: str) -> float | None:
    """Jobs per second the model's workers finished recently (cached 2 s per process)."""
    now = time.monotonic()
    key = (str(session.get_bind().url), model)
    hit = _throughput.get(key)
    if hit is not None and now - hit[0] < 2.0:
        return hit[1]
    since = utcnow() - timedelta(seconds=THROUGHPUT_MAX_AGE_S)
    times = sorted(
        session.execute(
            select(Job.finished_at)
            .where(Job.model == model, Job.status.in_((SUCCEEDED, FAILED)), Job.finished_at >= since)
            .order_by(Job.finished_at.desc())
            .limit(THROUGHPUT_WINDOW)
        ).scalars()
    )
    rate = None
    if len(times) >= 3 and times[-1] > times[0]:
        rate = (len(times) - 1) / (times[-1] - times[0]).total_seconds()
    _throughput[key] = (now, rate)
    return rate


def queue_info(session, job: Job) -> tuple[int | None, float | None]:
    """``(queue_position, eta_seconds)``: the jobs ahead, and when this one should be
    done at the model's recent throughput (``(position + 1) / jobs per second``)."""
    position = fairness.position(session, job)  # the fair order's estimate
    if position is None:
        return None, None
    rate = throughput(session, job.model)
    return position, None if rate is None else round((position + 1) / rate, 1)


def job_json(job: Job, session=None) -> dict[str, Any]:
    """The job's JSON as the API shows it, links pointing where this request came in
    (the queue fields need a session); ``vramq.jobs.views.job_json`` with this request's links."""
    return domain_views.job_json(
        job, links(), (lambda j: queue_info(session, j)) if session is not None else (lambda j: (None, None))
    )
