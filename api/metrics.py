"""Prometheus metrics of the API process; job gauges read from the database, per-card
figures read from the workers' heartbeats and the retention sweeper's totals read from
Redis, all at scrape time (one scrape target for the whole installation).

Under gunicorn with several processes, ``PROMETHEUS_MULTIPROC_DIR`` is set (``vramq api``
does it) and counters from every process are summed at scrape time.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from vramq.jobs.heartbeat import live_workers
from vramq.jobs.retention import deleted_totals
from vramq.jobs.schema import Job

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


class CardCollector:
    """Per card (one worker each): memory budget, estimated and measured use, resident
    models; per model on it: loads, evictions and load seconds. From live heartbeats."""

    def __init__(self, services):
        self.services = services

    def collect(self):
        labels = ["card", "host", "worker"]
        vram = {
            k: GaugeMetricFamily(f"vramq_card_vram_{k}_bytes", help_, labels=labels)
            for k, help_ in (
                ("budget", "Memory the card's models may take together"),
                ("estimated", "Sum of the planner's estimates of the models resident on the card"),
                ("measured", "Memory in use as the device reports it (NVML; the process RSS on the CPU)"),
            )
        }
        resident = GaugeMetricFamily("vramq_card_resident_models", "Models resident on the card", labels=labels)
        per_model = labels + ["model"]
        loaded = GaugeMetricFamily("vramq_model_resident", "1 if the model is resident on the card", labels=per_model)
        loads = CounterMetricFamily("vramq_model_loads", "Model loads (cold starts included)", labels=per_model)
        evictions = CounterMetricFamily("vramq_model_evictions", "Models evicted to make room", labels=per_model)
        load_s = CounterMetricFamily("vramq_model_load_seconds", "Seconds spent loading the model", labels=per_model)
        try:
            workers = live_workers(self.services.redis)
        except Exception:  # broker down: no card figures this scrape
            workers = []
        for w in workers:
            key = [w.get("card", ""), w.get("host", ""), w.get("name", "")]
            figures = w.get("vram")
            if figures is not None:
                for k, value in (
                    ("budget", figures["budget_bytes"]),
                    ("estimated", figures["estimated_bytes"]),
                    ("measured", figures["measured_bytes"]),
                ):
                    if value is not None:
                        vram[k].add_metric(key, value)
            resident.add_metric(key, len(w.get("resident", [])))
            for model, st in (w.get("models_stats") or {}).items():
                mkey = key + [model]
                loaded.add_metric(mkey, 1.0 if model in w.get("resident", []) else 0.0)
                loads.add_metric(mkey, st["loads"])
                evictions.add_metric(mkey, st["evictions"])
                load_s.add_metric(mkey, st["load_seconds"])
        yield from vram.values()
        yield from (resident, loaded, loads, evictions, load_s)


class RetentionCollector:
    """``vramq_retention_deleted_total{what}``: what the retention sweeper deleted, per
    class. The sweeper is a process of its own, so its totals live in Redis
    (``jobs.retention.DELETED_KEY``) and are read here at scrape time."""

    def __init__(self, services):
        self.services = services

    def collect(self):
        import redis

        deleted = CounterMetricFamily(
            "vramq_retention_deleted", "Things the retention sweeper deleted, by class", labels=["what"]
        )
        try:
            totals = deleted_totals(self.services.redis)
        except redis.RedisError:  # broker down: no retention figures this scrape
            totals = {}
        for what, count in totals.items():
            deleted.add_metric([what], count)
        yield deleted


def exposition(services) -> bytes:
    """This process's metrics (or every gunicorn process's, summed), then the job gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry
    jobs = CollectorRegistry()
    jobs.register(JobStateCollector(services))
    jobs.register(CardCollector(services))
    jobs.register(RetentionCollector(services))
    return generate_latest(registry) + generate_latest(jobs)
