"""The worker runtime: resident backends, their batchers, and each job's way through them.

One ``WorkerRuntime`` per worker process. Celery task threads call ``execute(job_id)``;
a reporter thread writes progress, renews leases, notices cancellations, queues again
the jobs of dead workers and announces this worker in Redis.

Which models are in memory is ``Residency``'s business: with a memory budget smaller
than the sum of the models' estimates, the models that fit load at start and the others
load when a job needs them, evicting the least recently used.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum

from jobs import defaults, fairness, heartbeat, ledger, lifecycle, webhooks
from jobs.db import writing
from jobs.errors import JobCanceled, JobError, OutOfMemory, VramqError
from jobs.events import EventWriter
from jobs.lifecycle import utcnow
from jobs.queue import publish
from jobs.schema import Batch, Job

from .backends import backend_class
from .backends.base import ItemResult, WorkItem, is_out_of_memory
from .batcher import BatchOutcome, Batcher
from .residency import Residency

log = logging.getLogger("vramq.worker")


class State(Enum):
    """A worker's lifecycle: it consumes only once every model is resident."""

    LOADING = "loading"
    READY = "ready"
    STOPPING = "stopping"


@dataclass
class _Running:
    job_id: str
    progress: float = 0.0
    reported: float = -1.0
    canceled: bool = False


@dataclass
class WorkerRuntime:
    services: object  # jobs.services.Services
    name: str
    device: str
    model_ids: list[str]
    card: str = "cpu"
    budget_bytes: int | None = None
    """Memory the models may take together (the card's capacity); None: no limit."""
    need_bytes: dict = field(default_factory=dict)
    """Each model's estimated need (``gpu_workers.vram``); needed when there is a budget."""
    state: State = State.LOADING
    residency: Residency | None = None
    _running: dict = field(default_factory=dict)
    events: EventWriter | None = None
    render: object = None
    """Renders a job for its webhook payload (``webhooks.renderer``), set by ``load``."""
    _missing: set = field(default_factory=set)
    """Hints whose rows never appeared (see ``_hint_committed``)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    # --- start and stop -----------------------------------------------------------

    def load(self) -> None:
        """Load the models that fit together, then start the reporter."""
        self.events = EventWriter(self.services.redis)
        self.render = webhooks.renderer(self.services)
        need = {m: self.need_bytes.get(m, 0) for m in self.model_ids}
        self.residency = Residency(need, self.budget_bytes, self._load_model, self._unload_model)
        # The reporter starts first: while the models load, the worker is announced as
        # "loading", so the API keeps admitting jobs for them (a restarted worker's models
        # may take minutes to load) and they wait in the queue.
        threading.Thread(target=self._report_loop, name="reporter", daemon=True).start()
        resident = self.residency.fits_alongside(self.model_ids)
        for model_id in resident:
            self.residency.load_now(model_id)
        on_demand = [m for m in self.model_ids if m not in resident]
        if on_demand:
            log.info("resident: %s; loaded on demand: %s (budget %s bytes)", resident, on_demand, self.budget_bytes)
        self.state = State.READY
        self._heartbeat()

    def _load_model(self, model_id: str):
        """Residency's loader: the backend loaded, and its batcher if it batches through one."""
        entry = self.services.catalog.get(model_id)
        backend = backend_class(entry)(entry, self.device)
        if self.budget_bytes and self.need_bytes.get(model_id):
            backend.memory_fraction = self.need_bytes[model_id] / self.budget_bytes
        gc.unfreeze()
        backend.load()
        batcher = None
        if backend.batching == "batcher":
            batcher = Batcher(backend, entry.max_batch, entry.max_wait_ms, model_id)
        # What is loaded now lives until evicted: keep it out of the collector's way
        # (libraries that call gc.collect() per item, like faster-whisper's decode_audio,
        # otherwise walk every model object each time). Unfrozen again before an eviction.
        gc.collect()
        gc.freeze()
        return backend, batcher

    def _unload_model(self, model_id: str, handle) -> None:
        backend, batcher = handle
        if batcher is not None:
            batcher.stop()
        gc.unfreeze()
        backend.unload()
        backend.release_memory()

    def stop(self) -> None:
        """Stop the reporter, then unload every model (their batchers stop first).

        Unloading is what stops a backend's own processes (vLLM's engine core and its
        workers); left running, they would outlive the worker and keep their memory.
        """
        self.state = State.STOPPING
        self._stop.set()
        if self.residency is not None:
            self.residency.unload_all()
        if self.events is not None:
            self.events.close()

    @property
    def concurrency(self) -> int:
        """Task threads. A batched model gets two batches' worth, so one batch gathers while
        another runs; an engine model (vLLM) gets ``max_batch``, its concurrent sequences."""
        total = 0
        for m in self.model_ids:
            entry = self.services.catalog.get(m)
            engine = backend_class(entry).batching == "engine"
            total += entry.max_batch if engine else 2 * entry.max_batch
        return total

    # --- one job ------------------------------------------------------------------

    def execute(self, hint: str, model: str, priority: str) -> None:
        """One turn at ``model``/``priority`` (a message, see jobs.queue): take the fairest
        queued job there (jobs.fairness) and run it. ``hint`` is the job or batch whose
        arrival sent the message; its row is waited for, as the API publishes just before
        it commits."""
        services = self.services
        if not self._hint_committed(hint):
            log.warning("message for unknown %s dropped", hint)
            return
        with writing(services.sessions) as s:
            job_id = fairness.take_next(s, model, priority, self.name, services.settings.lease_s)
        if job_id is None:
            log.debug("turn at %s/%s: nothing queued", model, priority)
            return
        with services.sessions() as s:
            job = s.get(Job, job_id)
        run = _Running(job_id)
        with self._lock:
            self._running[job_id] = run
        try:
            self._run(job, run)
        finally:
            with self._lock:
                self._running.pop(job_id, None)

    def _hint_committed(self, hint: str) -> bool:
        # The API publishes just before it commits; give the commit a moment to land. A
        # hint that never appears (its transaction failed) is remembered, so the other
        # messages of a failed batch are dropped without waiting again.
        if hint in self._missing:
            return False
        table = Batch if hint.startswith("batch_") else Job
        deadline = time.monotonic() + defaults.MISSING_JOB_GRACE_S
        while True:
            with self.services.sessions() as s:
                if s.get(table, hint) is not None:
                    return True
            if time.monotonic() > deadline:
                self._missing.add(hint)
                return False
            time.sleep(0.05)

    def _run(self, job: Job, run: _Running) -> None:
        services = self.services
        self.events.put(job.id, "status", {"status": lifecycle.RUNNING})
        queued_s = (job.started_at - job.created_at).total_seconds() if job.started_at else 0.0
        try:
            attachments = self._attachments(job)
        except VramqError as exc:
            self._fail(job, getattr(exc, "code", "invalid_input"), str(exc), 0.0)
            return
        item = WorkItem(
            job_id=job.id,
            input=job.input,
            on_progress=lambda f: setattr(run, "progress", f),
            is_canceled=lambda: run.canceled,
            on_delta=lambda text: self.events.put(job.id, "delta", {"text": text}),
            attachments=attachments,
        )
        with self.residency.use(job.model) as lease:
            outcome = self._compute(lease.handle, item)
        result = outcome.result
        if isinstance(result, JobCanceled) or run.canceled:
            log.info("job %s canceled while running", job.id)
            return
        if isinstance(result, BaseException):
            code = result.code if isinstance(result, JobError) else "internal_error"
            if is_out_of_memory(result):
                code = OutOfMemory.code
            self._fail(job, code, str(result) or result.__class__.__name__, outcome.gpu_seconds)
            return
        prefix = f"jobs/{job.id}/{job.attempts}/"
        try:
            output = self._store(prefix, result)
        except Exception as exc:
            log.exception("storing outputs of %s failed", job.id)
            self._fail(job, "storage_unavailable", f"could not store outputs: {exc}", outcome.gpu_seconds)
            return
        usage = {"batch_size": outcome.batch_size, "queue_seconds": round(queued_s, 4),
                 "cold_start_seconds": round(lease.cold_start_s, 4)}
        expires = utcnow() + timedelta(hours=services.settings.retention_hours)
        with services.sessions.begin() as s:
            won = lifecycle.succeed(s, job.id, self.name, output, outcome.gpu_seconds, usage, expires)
            if won:  # in the same transaction: a success is settled and announced exactly once
                ledger.settle(s, job, outcome.gpu_seconds, services.allowances, utcnow())
                webhooks.enqueue(s, job.id, "job.succeeded", self.render)
        if won:
            self.events.put(job.id, "progress", {"progress": 1.0})
            self.events.put(job.id, "done", {"status": lifecycle.SUCCEEDED})
        else:  # canceled meanwhile, or our lease lapsed and another worker has it
            services.store.delete_prefix(prefix)

    def _compute(self, handle, item: WorkItem) -> BatchOutcome:
        """Run the item through its model's batcher, or straight into its engine."""
        backend, batcher = handle
        if batcher is not None:
            outcome = batcher.submit(item).result()
        else:
            t0 = time.perf_counter()
            try:
                result = backend.run_one(item)
            except BaseException as exc:  # the job's own failure; the worker goes on
                result = exc
            outcome = BatchOutcome(result, time.perf_counter() - t0, 1)
        measured = getattr(outcome.result, "gpu_seconds", None)
        if measured is not None:
            outcome.gpu_seconds = measured
        return outcome

    def _attachments(self, job: Job) -> dict[str, bytes]:
        """Fetch the binary inputs a job refers to (the audio of a speech job)."""
        if job.kind != "speech":
            return {}
        from jobs.files import resolve_audio

        return {"audio": resolve_audio(self.services, job.input["audio"])}

    def _fail(self, job: Job, code: str, message: str, gpu_seconds: float) -> None:
        with self.services.sessions.begin() as s:
            won = lifecycle.fail(s, job.id, self.name, code, message, gpu_seconds)
            if won:  # failed jobs are not charged
                ledger.refund(s, job.id, utcnow(), f"refund: job failed ({code})")
                webhooks.enqueue(s, job.id, "job.failed", self.render)
        if won:
            self.events.put(job.id, "done", {"status": lifecycle.FAILED})

    def _store(self, prefix: str, result: ItemResult) -> dict:
        keys = {}
        for art in result.artifacts:
            key = prefix + art.name
            self.services.store.put(key, art.data, art.content_type)
            keys[art.name] = key
        return _link_artifacts(result.output, keys)

    # --- the reporter -------------------------------------------------------------

    def _report_loop(self) -> None:
        services = self.services
        lease_every = services.settings.lease_s / 3
        reap_every = max(services.settings.lease_s / 2, 1.0)
        last_lease = last_reap = last_beat = float("-inf")
        while not self._stop.wait(defaults.REPORT_INTERVAL_S):
            now = time.monotonic()
            try:
                with self._lock:
                    running = dict(self._running)
                if running:
                    self._report(running, renew=now - last_lease >= lease_every)
                    if now - last_lease >= lease_every:
                        last_lease = now
                if now - last_reap >= reap_every:
                    last_reap = now
                    self._reap()
                if now - last_beat >= heartbeat.TTL_S / 3:
                    last_beat = now
                    self._heartbeat()
            except Exception:  # the database or broker blinked: try again next tick
                log.exception("reporter tick failed")

    def _report(self, running: dict[str, _Running], renew: bool) -> None:
        changed = {jid: r.progress for jid, r in running.items() if r.progress != r.reported}
        with self.services.sessions.begin() as s:
            if changed:
                lifecycle.record_progress(s, self.name, changed)
            canceled = lifecycle.canceled_among(s, running)
            if renew:
                lifecycle.renew(s, self.name, running, self.services.settings.lease_s)
        for jid, p in changed.items():
            running[jid].reported = p
            self.events.put(jid, "progress", {"progress": round(p, 4)})
        for jid in canceled:
            running[jid].canceled = True

    def _reap(self) -> None:
        """Queue again the jobs whose worker stopped renewing their lease."""
        with self.services.sessions.begin() as s:
            requeued = lifecycle.requeue_expired(s)
            for job_id, model, priority in requeued:
                publish(self.services.celery, job_id, model, priority)
        for job_id, model, _ in requeued:
            self.events.put(job_id, "status", {"status": lifecycle.QUEUED})
            log.warning("job %s (%s) lost its worker; queued again", job_id, model)

    def _heartbeat(self) -> None:
        heartbeat.announce(self.services.redis, self.name, self.describe())

    def describe(self) -> dict:
        """This worker as its heartbeat tells it: the API's ``/v1/workers`` and per-card metrics."""
        res = self.residency
        stats = {m: {"loads": st.loads, "evictions": st.evictions, "load_seconds": round(st.load_seconds, 4)}
                 for m, st in res.stats.items()}
        return {"name": self.name, "card": self.card, "models": self.model_ids, "pid": os.getpid(),
                "host": socket.gethostname(), "state": self.state.value, "running": len(self._running),
                "resident": res.resident, "models_stats": stats, "need_bytes": self.need_bytes,
                "vram": {"budget_bytes": self.budget_bytes, "estimated_bytes": res.resident_bytes,
                         "measured_bytes": measured_bytes(self.device)}}


def measured_bytes(device: str) -> int | None:
    """Memory in use as the device reports it: the card's used bytes (NVML, every process
    on the card, vLLM's engine included), or on the CPU this process's resident set."""
    if device == "cpu":
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            index = int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def _link_artifacts(value, keys: dict[str, str]):
    """Replace ``{"$artifact": name}`` with ``{"$object": key}`` (see backends.base.ItemResult)."""
    if isinstance(value, dict):
        if set(value) == {"$artifact"}:
            return {"$object": keys[value["$artifact"]]}
        return {k: _link_artifacts(v, keys) for k, v in value.items()}
    if isinstance(value, list):
        return [_link_artifacts(v, keys) for v in value]
    return value

