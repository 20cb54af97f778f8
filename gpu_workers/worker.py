"""``vramq worker``: one Celery worker process pinned to one card, its models resident.

The card is pinned with ``CUDA_VISIBLE_DEVICES`` before anything imports torch, so the
process sees exactly one GPU (as ``cuda:0``). The pool is ``threads``: a forked pool
would load one copy of each model per child. Models load before the worker consumes a
single message; a worker that cannot load its models exits instead of taking jobs it
cannot run.
"""

from __future__ import annotations

import logging
import os
import socket

from jobs.errors import ConfigError
from jobs.queue import RUN_JOB, queue_name
from jobs.services import Services
from jobs.settings import Settings

log = logging.getLogger("vramq.worker")


def pin(card: int | None) -> str:
    """Pin this process to one card (or none) and return the torch device to use."""
    if card is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = str(card)
    return "cuda"


def run_worker(card: int | None, models: list[str] | None = None, settings: Settings | None = None, loglevel: str = "INFO") -> None:
    """Load the models, then consume their queues until stopped (SIGTERM: warm shutdown)."""
    device = pin(card)
    from .runtime import WorkerRuntime  # after pinning: backends may import torch

    services = Services.from_settings(settings or Settings.from_env())
    model_ids = models or list(services.catalog.models)
    unknown = [m for m in model_ids if services.catalog.get(m) is None]
    if unknown:
        raise ConfigError(f"unknown models {unknown}; the catalog has {sorted(services.catalog.models)}")
    card_name = "cpu" if card is None else f"card{card}"
    name = f"{card_name}-{os.getpid()}@{socket.gethostname()}"
    runtime = WorkerRuntime(services, name=name, device=device, model_ids=model_ids, card=card_name)
    runtime.load()

    app = services.celery

    @app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
    def run_job(job_id: str) -> None:
        runtime.execute(job_id)

    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={runtime.concurrency}",
        f"--queues={','.join(queue_name(m) for m in model_ids)}",
        f"--hostname={name}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    log.info("worker %s serving %s on %s", name, model_ids, device)
    try:
        app.worker_main(argv)
    finally:
        runtime.stop()
        from jobs.heartbeat import withdraw

        try:
            withdraw(services.redis, name)
        except Exception:
            pass
