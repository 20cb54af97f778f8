"""Prometheus metrics of the API process, and the job gauges read from the database at scrape time.

Under gunicorn with several processes, ``PROMETHEUS_MULTIPROC_DIR`` is set (``vramq api``
does it) and counters from every process are summed at scrape time.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from jobs.schema import Job

JOBS_SUBMITTED = Counter("vramq_jobs_submitted_total", "Jobs accepted by the API", ["model"])
REQUESTS = Histogram(
    "vramq_http_request_seconds",
    "HTTP request latency",
    ["method", "endpoint", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


class JobStateCollector:
    """``vramq_jobs{model,status}``: job counts by state, read from the database."""

    def __init__(self, services):
        self.services = services

    def collect(self):
        gauge = GaugeMetricFamily("vramq_jobs", "Jobs by model and status", labels=["model", "status"])
        with self.services.sessions() as session:
            rows = session.execute(select(Job.model, Job.status, func.count()).group_by(Job.model, Job.status))
            for model, status, count in rows:
                gauge.add_metric([model, status], count)
        yield gauge


def render(services) -> bytes:
    """This process's metrics (or every gunicorn process's, summed), then the job gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry
    jobs = CollectorRegistry()
    jobs.register(JobStateCollector(services))
    return generate_latest(registry) + generate_latest(jobs)
