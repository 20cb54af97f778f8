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
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError

from vramq.jobs import defaults, fairness, heartbeat, lifecycle, outcomes, turns
from vramq.jobs.db import writing
from vramq.jobs.errors import JobCanceled, JobError, ModelLoadFailed, OutOfMemory, VramqError
from vramq.jobs.events import EventWriter
from vramq.jobs.lifecycle import utcnow
from vramq.jobs.outcomes import Failed, GivenBack, LeaseLapsed, Outcome, Succeeded
from vramq.jobs.priorities import Priority
from vramq.jobs.queue import publish
from vramq.jobs.schema import Batch, Job
from vramq.jobs.webhooks import outbox

from .backends import backend_class
from .backends.base import ItemResult, WorkItem, is_out_of_memory
from .batcher import Batcher, BatchOutcome
from .residency import Residency
from .spool import Spool

if TYPE_CHECKING:
    from vramq.jobs.services import Services

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
    on_its_way: bool = True
    """Taken, not yet handed to its model's batcher (``Batcher.arriving``)."""


@dataclass
class WorkerRuntime:
    services: Services
    name: str
    device: str
    model_ids: list[str]
    card: str = "cpu"
    budget_bytes: int | None = None
    """Memory the models may take together (the card's capacity); None: no limit."""
    need_bytes: dict[str, int] = field(default_factory=dict)
    """Each model's estimated need (``gpu_workers.vram``); needed when there is a budget."""
    state: State = State.LOADING
    residency: Residency | None = None
    _running: dict[str, _Running] = field(default_factory=dict)
    events: EventWriter | None = None
    job_json: Callable[[Job], dict[str, Any]] | None = None
    """A job's JSON for its webhook payload (``webhooks.outbox.job_json_for``), set by ``load``."""
    _missing: set[str] = field(default_factory=set)
    """Hints whose rows never appeared (see ``_hint_committed``)."""
    spool: Spool | None = None
    """Outputs the store refused, retried from disk (``gpu_workers.spool``)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _on_their_way: dict[str, int] = field(default_factory=dict)
    """Jobs taken and not yet handed to their model's batcher, by model."""

    # --- start and stop -----------------------------------------------------------

    def load(self) -> None:
        """Load the models that fit together, then start the reporter."""
        self.events = EventWriter(self.services.redis)
        self.job_json = outbox.job_json_for(self.services)
        settings = self.services.settings
        self.spool = Spool(
            _spool_folder(settings.data_dir),
            self.services.store,
            max_seconds=settings.spool_s,
            max_bytes=settings.spool_max_bytes,
        ).start()
        need = {m: self.need_bytes.get(m, 0) for m in self.model_ids}
        self.residency = Residency(need, self.budget_bytes, self._load_model, self._unload_model)
        # The reporter starts first: while the models load, the worker is announced as
        # "loading", so the API keeps admitting jobs for them (a restarted worker's models
        # may take minutes to load) and they wait in the queue.
        threading.Thread(target=self._report_loop, name="reporter", daemon=True).start()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
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
        assert entry is not None, model_id  # the worker serves catalog models only (run_worker checks)
        backend = backend_class(entry)(entry, self.device)
        if self.budget_bytes and self.need_bytes.get(model_id):
            backend.memory_fraction = self.need_bytes[model_id] / self.budget_bytes
        gc.unfreeze()
        backend.load()
        batcher = None
        if backend.batching == "batcher":
            batcher = Batcher(
                backend, entry.max_batch, entry.max_wait_ms, model_id, lambda: self._on_their_way.get(model_id, 0)
            )
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
        if self.spool is not None:  # outputs not stored yet: their jobs run again elsewhere
            self.give_back(self.spool.stop())
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
            assert entry is not None, m  # the worker serves catalog models only (run_worker checks)
            engine = backend_class(entry).batching == "engine"
            total += entry.max_batch if engine else 2 * entry.max_batch
        return total

    # --- one job ------------------------------------------------------------------

    def execute(self, hint: str, model: str, priority: Priority) -> None:
        """One turn at ``model``/``priority`` (a message, see jobs.queue): take the fairest
        queued job there (jobs.fairness) and run it. ``hint`` is the job or batch whose
        arrival sent the message: when nothing is queued yet, its row is waited for, as
        the API publishes just before it commits."""
        services = self.services
        assert self.residency is not None, "load() first"
        if model in self.residency.failed and self._served_elsewhere(model):
            # This worker cannot load the model but another can: pass the turn on rather
            # than fail a job that worker would run (after a pause, not to spin on it).
            time.sleep(0.5)
            publish(services.celery, hint, model, priority)
            return
        job = self._take(model, priority)
        if job is None:
            if not self._hint_committed(hint):
                log.warning("message for unknown %s dropped", hint)
                return
            job = self._take(model, priority)
        if job is None:
            log.debug("turn at %s/%s: nothing queued", model, priority)
            return
        job_id = job.id
        run = _Running(job_id)
        with self._lock:
            self._running[job_id] = run
            self._on_their_way[job.model] = self._on_their_way.get(job.model, 0) + 1
        spooled = False
        try:
            spooled = self._run(job, run)
        finally:
            self._arrived(run, job.model)
            if not spooled:  # a spooled job stays ours (its lease renewed) until it lands
                self._forget(job_id)

    def _arrived(self, run: _Running, model: str) -> None:
        """The job is with its model's batcher now (or will never be): no longer on its way."""
        with self._lock:
            if run.on_its_way:
                run.on_its_way = False
                self._on_their_way[model] -= 1

    def _take(self, model: str, priority: Priority) -> Job | None:
        with writing(self.services.sessions) as s:
            return fairness.take_next_job(s, model, priority, self.name, self.services.settings.lease_s)

    def _served_elsewhere(self, model: str) -> bool:
        """Whether another live worker serves ``model`` and has not failed to load it."""
        try:
            others = [w for w in heartbeat.live_workers(self.services.redis) if w.get("name") != self.name]
        except Exception:  # broker down: the turn cannot be passed on anyway
            return False
        return model in heartbeat.served_by(others)

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._running.pop(job_id, None)

    def give_back(self, job_ids: list[str]) -> None:
        """Hand running jobs back to the queue (a stopping worker): queued again at once,
        with a turn each, the attempt not counted."""
        for job_id in job_ids:
            try:
                with self.services.sessions.begin() as s:
                    ending = outcomes.end(s, GivenBack(), job_id=job_id, worker=self.name)
                ending.publish(self.services.celery)
                assert self.events is not None, "load() first"
                ending.announce(self.events)
                if ending.won:
                    log.info("job %s given back to the queue", job_id)
            except Exception as exc:  # database or broker down: the lease brings it back
                log.warning("could not give job %s back (%s); it returns when its lease lapses", job_id, exc)
            self._forget(job_id)

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._running)

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

    def _run(self, job: Job, run: _Running) -> bool:
        """Run one taken job to its end. True when its outputs are spooled: the job is
        still running (under this worker's lease) until the store takes them."""
        events, residency = self.events, self.residency
        assert events is not None and residency is not None, "load() first"
        events.put(job.id, "status", {"status": lifecycle.RUNNING})
        queued_s = (job.started_at - job.created_at).total_seconds() if job.started_at else 0.0
        try:
            attachments = self._attachments(job)
        except VramqError as exc:
            self._end(job, Failed(getattr(exc, "code", "invalid_input"), str(exc)))
            return False
        item = WorkItem(
            job_id=job.id,
            input=job.input,
            on_progress=lambda f: setattr(run, "progress", f),
            is_canceled=lambda: run.canceled,
            on_delta=lambda text: events.put(job.id, "delta", {"text": text}),
            attachments=attachments,
        )
        try:
            with residency.use(job.model) as hold:
                outcome = self._compute(hold.handle, item, lambda: self._arrived(run, job.model))
        except ModelLoadFailed as exc:  # the job fails; the worker goes on with its other models
            self._heartbeat()  # announce the failed model now: admission stops sending jobs for it
            self._end(job, Failed(exc.code, str(exc)))
            return False
        result = outcome.result
        if isinstance(result, JobCanceled) or run.canceled:
            log.info("job %s canceled while running", job.id)
            return False
        if isinstance(result, BaseException):
            code = result.code if isinstance(result, JobError) else "internal_error"
            if is_out_of_memory(result):
                code = OutOfMemory.code
            self._end(job, Failed(code, str(result) or result.__class__.__name__, outcome.gpu_seconds))
            return False
        prefix = f"jobs/{job.id}/{job.attempts}/"
        usage = {
            "batch_size": outcome.batch_size,
            "queue_seconds": round(queued_s, 4),
            "cold_start_seconds": round(hold.cold_start_s, 4),
        }

        def stored(keys: dict[str, str]) -> None:
            self._succeeded(job, prefix, _link_artifacts(result.output, keys), outcome.gpu_seconds, usage)

        try:
            keys = self._store(prefix, result)
        except Exception as exc:  # the store is down: keep the GPU work on disk and retry

            def give_up(reason: str) -> None:
                self._end(job, Failed("storage_unavailable", f"could not store outputs: {reason}", outcome.gpu_seconds))
                self._forget(job.id)

            def landed(keys: dict[str, str]) -> None:
                stored(keys)
                self._forget(job.id)

            spool = self.spool
            assert spool is not None, "load() first"
            spool.hold(job.id, prefix, result.artifacts, str(exc), landed, give_up)
            return job.id in spool.held
        stored(keys)
        return False

    def _succeeded(self, job: Job, prefix: str, output: dict, gpu_seconds: float, usage: dict) -> None:
        expires = utcnow() + timedelta(hours=self.services.settings.retention_hours)
        ending = self._end(job, Succeeded(output, gpu_seconds, usage, expires))
        # The winner's outputs are the job's only ones: the winner drops what an earlier
        # attempt killed mid-upload left behind, and a losing attempt drops its own.
        try:
            row = None if ending.won else self._row(job.id)
            if ending.won or _won_before(row, prefix):
                store = self.services.store
                for folder in {
                    key[: key.index("/", len(f"jobs/{job.id}/")) + 1] for key in store.list(f"jobs/{job.id}/")
                } - {prefix}:
                    store.delete_prefix(folder)
            elif not self._folder_in_use(row, job):
                self.services.store.delete_prefix(prefix)
        except Exception as exc:
            log.warning("could not tidy the outputs of other attempts of %s: %s", job.id, exc)

    def _row(self, job_id: str) -> Job | None:
        with self.services.sessions() as s:
            return s.get(Job, job_id)

    def _folder_in_use(self, row: Job | None, job: Job) -> bool:
        """Whether another worker runs the job under the same attempt number (it was given
        back, so its next attempt reuses the folder): then the folder is not ours to delete."""
        return (
            row is not None
            and row.status == lifecycle.RUNNING
            and row.attempts == job.attempts
            and row.lease_owner != self.name
        )

    def _end(self, job: Job, outcome: Outcome) -> outcomes.Ending:
        """Record the job's end (``jobs.outcomes.end``: transition, ledger, webhook), then
        append its events. Does nothing if this worker no longer owns the job.

        A database that is down is waited for (backoff, up to three leases; the job stays
        this worker's, its lease renewed as soon as the database answers): a finished job
        is not thrown back to the queue, nor counted as a lost worker, over a blip."""
        deadline = time.monotonic() + 3 * self.services.settings.lease_s
        pause = 0.25
        while True:
            try:
                with self.services.sessions.begin() as s:
                    ending = outcomes.end(
                        s,
                        outcome,
                        job_id=job.id,
                        worker=self.name,
                        allowances=self.services.allowances,
                        job_json=self.job_json,
                    )
                break
            except DBAPIError as exc:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("recording the end of %s failed (%s); retrying in %.1fs", job.id, exc.orig, pause)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
        assert self.events is not None, "load() first"
        ending.announce(self.events)
        return ending

    def _compute(self, handle, item: WorkItem, handed_over: Callable[[], None]) -> BatchOutcome:
        """Run the item through its model's batcher, or straight into its engine."""
        backend, batcher = handle
        if batcher is not None:
            future = batcher.submit(item)
            handed_over()
            outcome = future.result()
        else:
            handed_over()
            t0 = time.perf_counter()
            result: ItemResult | BaseException
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
        from vramq.jobs.files import resolve_audio

        return {"audio": resolve_audio(self.services, job.input["audio"])}

    def _store(self, prefix: str, result: ItemResult) -> dict[str, str]:
        """Store each artifact under ``prefix``; return its key by artifact name."""
        keys = {}
        for art in result.artifacts:
            key = prefix + art.name
            self.services.store.put(key, art.data, art.content_type)
            keys[art.name] = key
        return keys

    # --- the reporter -------------------------------------------------------------

    def _report_loop(self) -> None:
        services = self.services
        lease_every = services.settings.lease_s / 3
        reap_every = max(services.settings.lease_s / 2, 1.0)
        reconciler = turns.Reconciler(services)
        last_lease = last_reap = last_turns = float("-inf")
        while not self._stop.wait(defaults.REPORT_INTERVAL_S):
            now = time.monotonic()
            # Each duty on its own: the broker down must not stop the lease renewals, nor
            # the database down the turns.
            with self._lock:
                running = dict(self._running)
            if running:
                renew = now - last_lease >= lease_every
                if self._duty("progress and leases", self._report, running, renew) and renew:
                    last_lease = now
            if now - last_reap >= reap_every:
                last_reap = now
                self._duty("requeuing lapsed leases", self._reap)
            if now - last_turns >= turns.CHECK_S and self.state == State.READY:
                last_turns = now
                self._duty("topping up turns", reconciler.tick_if_turn)

    def _heartbeat_loop(self) -> None:
        """The heartbeat on a thread of its own: a slow or hung database statement of the
        reporter's must not let it lapse (the API would refuse the worker's models as
        served by nobody)."""
        while True:
            self._duty("heartbeat", self._heartbeat)
            if self._stop.wait(heartbeat.TTL_S / 3):
                return

    def _duty(self, what: str, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception as exc:  # the database or broker blinked: the next tick tries again
            log.warning("%s failed: %s", what, exc)
            return False

    def _report(self, running: dict[str, _Running], renew: bool) -> None:
        assert self.events is not None, "load() first"
        changed = {jid: r.progress for jid, r in running.items() if r.progress != r.reported}
        with self.services.sessions.begin() as s:
            if changed:
                lifecycle.record_progress(s, self.name, changed)
            canceled = lifecycle.canceled_among(s, running)
            if renew:
                lifecycle.renew(s, self.name, running, self.services.settings.lease_s)
        for jid in canceled:
            running[jid].canceled = True
        for jid, p in changed.items():
            running[jid].reported = p
            if not running[jid].canceled:  # a canceled job's stream ended with the cancel
                self.events.put(jid, "progress", {"progress": round(p, 4)})

    def _reap(self) -> None:
        """Queue again the jobs whose worker stopped renewing their lease, or fail those
        that have lost their worker ``VRAMQ_MAX_ATTEMPTS`` times (``worker_lost``)."""
        lapsed = LeaseLapsed(self.services.settings.max_attempts)
        with self.services.sessions.begin() as s:
            ending = outcomes.end(s, lapsed, allowances=self.services.allowances, job_json=self.job_json)
        assert self.events is not None, "load() first"
        ending.announce(self.events)
        for job_id, model, _ in ending.turns:
            log.warning("job %s (%s) lost its worker; queued again", job_id, model)
        for job_id in ending.ids(lifecycle.FAILED):
            log.error("job %s lost its worker %d times; failed (%s)", job_id, lapsed.max_attempts, outcomes.WORKER_LOST)
        ending.publish(self.services.celery)  # after the commit: a turn never precedes its job

    def _heartbeat(self) -> None:
        heartbeat.announce(self.services.redis, self.name, self.describe())

    def describe(self) -> heartbeat.WorkerBeat:
        """This worker as its heartbeat tells it: the API's ``/v1/workers`` and per-card metrics."""
        res = self.residency
        assert res is not None, "load() first"
        stats: dict[str, heartbeat.ModelStats] = {
            m: {"loads": st.loads, "evictions": st.evictions, "load_seconds": round(st.load_seconds, 4)}
            for m, st in res.stats.items()
        }
        return {
            "name": self.name,
            "card": self.card,
            "models": self.model_ids,
            "failed_models": res.failed,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "state": self.state.value,
            "running": len(self._running),
            "resident": res.resident,
            "models_stats": stats,
            "need_bytes": self.need_bytes,
            "vram": {
                "budget_bytes": self.budget_bytes,
                "estimated_bytes": res.resident_bytes,
                "measured_bytes": measured_bytes(self.device),
            },
        }


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


def _spool_folder(data_dir: Path) -> Path:
    """This process's spool folder, ``<data_dir>/spool/<pid>``; the folders of processes
    no longer alive on this host are removed (their jobs ran again through their leases)."""
    import shutil

    root = Path(data_dir) / "spool"
    if root.is_dir():
        for folder in root.iterdir():
            if folder.name.isdigit() and not _alive(int(folder.name)):
                shutil.rmtree(folder, ignore_errors=True)
    return root / str(os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _won_before(row: Job | None, prefix: str) -> bool:
    """Whether the job's recorded outputs are this attempt's: a success whose COMMIT went
    through while its answer was lost (the retry then finds nothing to move)."""
    return row is not None and row.status == lifecycle.SUCCEEDED and prefix in json.dumps(row.output)
