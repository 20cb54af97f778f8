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
import signal
import socket
import threading
import time

from vramq.jobs import defaults, proctree
from vramq.jobs.errors import ConfigError
from vramq.jobs.priorities import Priority
from vramq.jobs.queue import RUN_JOB, queue_name
from vramq.jobs.services import Services
from vramq.jobs.settings import Settings
from vramq.storage import store_for

log = logging.getLogger("vramq.worker")


def pin(card: int | None) -> str:
    """Pin this process to one card (or none) and return the torch device to use."""
    if card is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = str(card)
    return "cuda"


def model_needs(catalog, model_ids: list[str], required: bool) -> dict[str, int]:
    """Each model's estimated memory need in bytes (``gpu_workers.vram``).

    ``required`` (a budget to keep): an estimate that fails stops the worker. Otherwise
    the need is only reported, and a failed estimate is logged and left out.
    """
    from .vram import estimate_entry

    need = {}
    for m in model_ids:
        try:
            need[m] = estimate_entry(catalog.get(m)).total_bytes
        except Exception as exc:
            if required:
                raise
            log.warning("no memory estimate for %s: %s", m, exc)
    return need


def card_capacity(card: int | None) -> int | None:
    """The card's memory from NVML; None on the CPU or where NVML cannot say."""
    if card is None:
        return None
    from .cards import discover

    return next((c.capacity_bytes for c in discover() if c.index == card), None)


def run_worker(
    card: int | None,
    models: list[str] | None = None,
    settings: Settings | None = None,
    loglevel: str = "INFO",
    budget_bytes: int | None = None,
    stop_grace_s: float = defaults.STOP_GRACE_S,
) -> None:
    """Load the models, then consume their queues until stopped (SIGTERM: warm shutdown).

    ``models`` in order of preference: those that fit ``budget_bytes`` together load at
    start, the rest on demand. The budget defaults to the card's memory (none on the CPU).
    On SIGTERM running jobs get ``stop_grace_s`` to finish; then they are handed back to
    the queue and the worker exits, taking its engine processes with it.
    """
    # Processes the backends fork (vLLM's engine core) die with this one, however it dies.
    proctree.children_die_with_me()
    budget = budget_bytes if budget_bytes is not None else card_capacity(card)
    device = pin(card)
    from .runtime import WorkerRuntime  # after pinning: backends may import torch

    services = Services.from_settings(settings or Settings.from_env(), store_factory=store_for)
    model_ids = models or list(services.catalog.models)
    unknown = [m for m in model_ids if services.catalog.get(m) is None]
    if unknown:
        raise ConfigError(f"unknown models {unknown}; the catalog has {sorted(services.catalog.models)}")
    card_name = "cpu" if card is None else f"card{card}"
    name = f"{card_name}-{os.getpid()}@{socket.gethostname()}"
    need = model_needs(services.catalog, model_ids, required=budget is not None)
    runtime = WorkerRuntime(
        services, name=name, device=device, model_ids=model_ids, card=card_name, budget_bytes=budget, need_bytes=need
    )
    runtime.load()

    app = services.celery

    @app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
    def run_job(hint: str, model: str, priority: Priority) -> None:
        runtime.execute(hint, model, priority)

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
    from celery.signals import after_setup_logger, worker_shutting_down

    def one_line_per_job_at_debug_only(**_kw) -> None:
        # Celery logs each task received and each task done at INFO: at hundreds of jobs
        # a second that is several per cent of the worker's CPU, and vramq's own log
        # says what matters. ``--log-level debug`` brings them back.
        if logging.getLevelName(loglevel.upper()) != logging.DEBUG:
            for name in ("celery.app.trace", "celery.worker.strategy"):
                logging.getLogger(name).setLevel(logging.WARNING)

    after_setup_logger.connect(one_line_per_job_at_debug_only, weak=False)

    def deadline_for_running_jobs(**_kw) -> None:  # Celery's warm shutdown has begun
        threading.Thread(target=_overdue, args=(runtime, stop_grace_s), name="stop-grace", daemon=True).start()

    worker_shutting_down.connect(deadline_for_running_jobs, weak=False)
    log.info("worker %s serving %s on %s", name, model_ids, device)
    try:
        app.worker_main(argv)
    finally:
        runtime.stop()
        from vramq.jobs.heartbeat import withdraw

        try:
            withdraw(services.redis, name)
        except Exception as exc:  # its heartbeat key expires by itself within seconds
            log.warning("could not withdraw %s from the live workers: %s", name, exc)


def _overdue(runtime, grace_s: float) -> None:
    """After the grace period, hand the jobs still running back and end the process (and
    its process group: the engine processes) so a stop never hangs on a stuck job."""
    time.sleep(grace_s)
    running = runtime.running_ids()
    log.warning("still %d jobs running %.0fs after SIGTERM; giving them back and exiting", len(running), grace_s)
    runtime.give_back(running)
    if os.getpgrp() == os.getpid():  # this worker leads its group: take the group with it
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(1)
