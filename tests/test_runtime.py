"""The worker runtime in process, with a fake backend.

A real ``WorkerRuntime`` (its residency, batcher, reporter thread, spool) on real
``Services`` built from ``Settings``: SQLite (and PostgreSQL where marked), the machine's
Redis, the local object store in a temporary folder. Only the model is fake: a
``Backend`` that follows the prompt it is given (``"ok"``, ``"oom"``, ``"block"`` …).
No Celery worker runs: the test calls ``execute`` as a task thread does, and jobs are
queued through the real submit path (``jobs.submit.submit_job``), which reserves their
tokens.

Each model id (and so each queue) and each worker name is unique to its test, so nothing
here mixes with another test's keys in Redis; and no assertion rests on what Redis holds
(another test may flush the database): the record is the job row, the ledger and the store.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from tests.conftest import settings_env
from tests.fixtures.services import services_for
from vramq.gpu_workers import runtime as runtime_module
from vramq.gpu_workers.backends.base import Artifact, Backend, ItemResult
from vramq.gpu_workers.runtime import State, WorkerRuntime
from vramq.jobs import ledger, outcomes
from vramq.jobs.accounts import Caller
from vramq.jobs.errors import JobCanceled, JobError, OutOfMemory
from vramq.jobs.schema import Job, LedgerEntry
from vramq.jobs.settings import Settings
from vramq.jobs.submit import submit_job
from vramq.storage.local import LocalStore

RATE = 200
"""The fake models' price: tokens per GPU-second."""
GPU_SECONDS = 1.5
"""What the fake backend reports each job used (``ItemResult.gpu_seconds``)."""
PNG = b"\x89PNG\r\n\x1a\n fake image of "
CALLER = Caller.anonymous("198.51.100.7")


# --- the fake model ----------------------------------------------------------------------


class FakeModels:
    """What the fake backend does, for every instance the runtime makes of it (one per load).

    The job's prompt says what happens: ``ok`` renders an image, ``oom`` / ``cuda-oom`` /
    ``refused`` / ``crash`` fail it, ``block`` reports progress 0.5 and waits for
    ``release`` (returning ``JobCanceled`` as soon as the job is canceled), ``late`` waits
    the same way but renders its image although the job was canceled."""

    def __init__(self, batching: str):
        self.batching = batching
        self.broken: set[str] = set()
        """Model ids whose load fails."""
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.saw_cancel = threading.Event()

    def backend_class(self, entry) -> type[Backend]:
        models = self

        class FakeBackend(Backend):
            batching = models.batching

            def load(self) -> None:
                models.loads.append(self.entry.id)
                if self.entry.id in models.broken:
                    raise OSError(f"{self.entry.weights}/model.safetensors: header truncated")

            def unload(self) -> None:
                models.unloads.append(self.entry.id)

            def run_batch(self, items):  # one result or exception per item (the contract)
                return [models.run(item) for item in items]

            def run_one(self, item):  # an engine backend raises to fail its job
                result = models.run(item)
                if isinstance(result, BaseException):
                    raise result
                return result

        return FakeBackend

    def run(self, item) -> ItemResult | BaseException:
        prompt = item.input["prompt"]
        if prompt == "oom":
            return OutOfMemory("the device ran out of memory for this job")
        if prompt == "cuda-oom":  # what torch raises: the runtime must still call it out_of_memory
            return RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if prompt == "refused":
            return JobError("the safety checker refused the prompt", code="prompt_refused")
        if prompt == "crash":
            return ZeroDivisionError("division by zero")
        if prompt == "block":
            item.on_progress(0.5)
            self.started.set()
            while not self.release.wait(0.02):
                if item.is_canceled():
                    self.saw_cancel.set()
                    return JobCanceled("canceled between steps")
        if prompt == "late":  # finishes anyway once canceled: the cancel came after its last step
            self.started.set()
            while not self.release.wait(0.02):
                if item.is_canceled():
                    self.saw_cancel.set()
                    break
        return ItemResult(
            output={"images": [{"$artifact": "image-0.png"}], "seed": item.input["seed"]},
            artifacts=[Artifact("image-0.png", PNG + item.job_id.encode(), "image/png")],
            gpu_seconds=GPU_SECONDS,
        )


# --- the installation ------------------------------------------------------------------


class Installation:
    """Services on a catalog of fake image models, a fake backend behind them, and the
    runtimes started on them (stopped at the end of the test)."""

    def __init__(self, tmp_path, redis_url: str, monkeypatch, database_url: str | None, batching: str, **settings):
        tag = uuid.uuid4().hex[:8]
        self.good, self.broken = f"fake-{tag}", f"fake-{tag}-broken"
        catalog = tmp_path / "catalog.toml"
        catalog.write_text(
            "".join(
                f'[[models]]\nid = "{m}"\nkind = "image"\nbackend = "diffusers"\nweights = "{tmp_path / m}"\n'
                f"max_batch = 2\nmax_wait_ms = 5\nprice = {{ tokens_per_gpu_second = {RATE} }}\n"
                f"limits = {{ max_width = 512, max_height = 512, min_side = 32, max_steps = 50 }}\n\n"
                for m in (self.good, self.broken)
            )
        )
        env = settings_env(
            tmp_path,
            redis_url=redis_url,
            models_dir=tmp_path / "no-models",
            catalog=catalog,
            database_url=database_url,
            **settings,
        )
        self.services = services_for(Settings.from_env(env))
        # Admission asks which models live workers serve; here they are these two, whatever
        # Redis holds (no test depends on heartbeats surviving another test's flush).
        self.services.served = _Served({self.good, self.broken})
        self.models = FakeModels(batching)
        monkeypatch.setattr(runtime_module, "backend_class", self.models.backend_class)
        self.runtimes: list[WorkerRuntime] = []
        self.tag = tag

    def runtime(self, model_ids: list[str] | None = None, **kw) -> WorkerRuntime:
        rt = WorkerRuntime(
            self.services,
            name=f"test-{self.tag}-{len(self.runtimes)}",
            device="cpu",
            model_ids=model_ids or [self.good],
            **kw,
        )
        self.runtimes.append(rt)
        rt.load()
        return rt

    def submit(self, prompt: str, model: str | None = None) -> str:
        job, created = submit_job(
            self.services,
            {"model": model or self.good, "input": {"prompt": prompt, "width": 64, "height": 64, "steps": 2}},
            caller=CALLER,
        )
        assert created and job.status == "queued"
        return job.id

    def job(self, job_id: str) -> Job:
        with self.services.sessions() as s:
            return s.get(Job, job_id)

    def ledger(self, job_id: str) -> list[tuple[str, int, int]]:
        """The job's ledger rows: (entry, allowance delta, balance delta), in order."""
        with self.services.sessions() as s:
            rows = s.execute(select(LedgerEntry).where(LedgerEntry.job_id == job_id).order_by(LedgerEntry.id))
            return [(r.entry, r.allowance_delta, r.balance_delta) for r in rows.scalars()]

    def used_today(self) -> int:
        with self.services.sessions() as s:
            return ledger.usage(s, CALLER.id, CALLER.tier, self.services.allowances, datetime.now(UTC)).used_today

    def objects(self, job_id: str) -> list[str]:
        return self.services.store.list(f"jobs/{job_id}/")

    def cancel(self, job_id: str) -> outcomes.Ending:
        """What ``POST /v1/jobs/{id}/cancel`` records."""
        with self.services.sessions.begin() as s:
            return outcomes.end(s, outcomes.Canceled(), job_id=job_id, allowances=self.services.allowances)

    def stop(self) -> None:
        for rt in self.runtimes:
            rt.stop()
        # The reporters notice the stop within one interval; let them go before the
        # database is dropped under them.
        deadline = time.monotonic() + 5
        while any(t.name == "reporter" and t.is_alive() for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.05)


class _Served:
    def __init__(self, models: set[str]):
        self.models = models

    def get(self) -> set[str]:
        return self.models


@pytest.fixture(params=["batcher", "engine"])
def batching(request) -> str:
    """How jobs reach the fake model: through the runtime's batcher, or straight to ``run_one``."""
    return request.param


@pytest.fixture
def db(request) -> str:
    """``sqlite`` unless a test is parametrized (indirectly) with ``postgresql``."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def install(tmp_path, redis_url, monkeypatch, request, db):
    """``install(batching="batcher", **settings)``: an ``Installation``, stopped at the end."""
    made: list[Installation] = []

    def make(batching: str = "batcher", **settings) -> Installation:
        database_url = request.getfixturevalue("pg_url") if db == "postgresql" else None
        inst = Installation(tmp_path, redis_url, monkeypatch, database_url, batching, **settings)
        made.append(inst)
        return inst

    yield make
    for inst in made:
        inst.stop()


def run_in_thread(rt: WorkerRuntime, job_id: str, model: str) -> threading.Thread:
    """``execute`` on a thread of its own, as a Celery task thread calls it."""
    thread = threading.Thread(target=rt.execute, args=(job_id, model, "normal"), daemon=True)
    thread.start()
    return thread


def wait_until(check, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.02)


def aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# --- a job runs to its end ----------------------------------------------------------------


@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
def test_a_queued_job_runs_to_succeeded_with_its_outputs_stored_and_its_cost_charged(install, batching):
    inst = install(batching)
    rt = inst.runtime()
    assert rt.state is State.READY and inst.models.loads == [inst.good]
    assert isinstance(inst.services.store, LocalStore)
    job_id = inst.submit("ok")
    reserved = inst.job(job_id).tokens_reserved
    assert reserved == 100  # the estimate is below the model's minimum
    assert inst.ledger(job_id) == [("reserve", -100, 0)]

    rt.execute(job_id, inst.good, "normal")

    job = inst.job(job_id)
    assert job.status == "succeeded" and job.error_code is None, (job.error_code, job.error_message)
    assert job.attempts == 1 and job.progress == 1.0 and job.lease_owner is None and job.finished_at is not None
    # Outputs: the artifact stored under the attempt's folder, the output pointing at it.
    key = f"jobs/{job_id}/1/image-0.png"
    assert job.output == {"images": [{"$object": key}], "seed": job.input["seed"]}
    assert inst.objects(job_id) == [key]
    assert inst.services.store.get(key) == PNG + job_id.encode()
    assert inst.services.store.open(key)[1] == "image/png"
    # Usage: the backend's measured seconds, charged at the model's rate above the reservation.
    assert job.gpu_seconds == pytest.approx(GPU_SECONDS)
    assert job.usage_detail["batch_size"] == 1 and job.usage_detail["cold_start_seconds"] == 0
    cost = math.ceil(GPU_SECONDS * RATE)
    assert cost > reserved and job.tokens_charged == cost
    assert inst.ledger(job_id) == [("reserve", -100, 0), ("settle", -(cost - reserved), 0)]
    assert inst.used_today() == cost
    assert rt.running_ids() == []


def test_a_turn_takes_a_queued_job_without_waiting_for_its_hint(install, monkeypatch):
    """A turn looks for its hint's row only when it finds nothing queued: the hint of a
    transaction that never committed does not hold up a job that is waiting."""
    inst = install()
    rt = inst.runtime()
    job_id = inst.submit("ok")
    monkeypatch.setattr(runtime_module.defaults, "MISSING_JOB_GRACE_S", 30.0)
    t0 = time.monotonic()
    rt.execute("job_never_committed", inst.good, "normal")
    assert time.monotonic() - t0 < 10  # not the 30 s grace
    assert inst.job(job_id).status == "succeeded"
    # Nothing queued: the hint is waited for (its grace), then the turn is dropped.
    monkeypatch.setattr(runtime_module.defaults, "MISSING_JOB_GRACE_S", 0.3)
    t0 = time.monotonic()
    rt.execute("job_never_committed_either", inst.good, "normal")
    assert time.monotonic() - t0 >= 0.3


def test_jobs_of_one_batch_each_get_their_own_outputs(install):
    inst = install("batcher")
    rt = inst.runtime()
    ids = [inst.submit("ok") for _ in range(2)]
    threads = [run_in_thread(rt, job_id, inst.good) for job_id in ids]
    for t in threads:
        t.join(10)
    for job_id in ids:
        job = inst.job(job_id)
        assert job.status == "succeeded" and inst.objects(job_id) == [f"jobs/{job_id}/1/image-0.png"]
        assert inst.services.store.get(f"jobs/{job_id}/1/image-0.png") == PNG + job_id.encode()
    assert inst.used_today() == 2 * math.ceil(GPU_SECONDS * RATE)


@pytest.mark.parametrize(
    "prompt, code, message",
    [
        ("oom", "out_of_memory", "ran out of memory"),
        ("cuda-oom", "out_of_memory", "CUDA out of memory"),
        ("refused", "prompt_refused", "safety checker refused"),
        ("crash", "internal_error", "division by zero"),
    ],
)
def test_a_job_the_backend_fails_ends_failed_with_its_code_and_is_refunded(install, batching, prompt, code, message):
    inst = install(batching)
    rt = inst.runtime()
    job_id = inst.submit(prompt)

    rt.execute(job_id, inst.good, "normal")

    job = inst.job(job_id)
    assert job.status == "failed" and job.error_code == code, (job.status, job.error_code, job.error_message)
    assert message in job.error_message
    assert job.output is None and inst.objects(job_id) == []
    assert job.tokens_charged == 0 and inst.ledger(job_id) == [("reserve", -100, 0), ("refund", 100, 0)]
    assert inst.used_today() == 0
    # The worker goes on: the next job succeeds on the same model.
    after = inst.submit("ok")
    rt.execute(after, inst.good, "normal")
    assert inst.job(after).status == "succeeded"


@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
def test_a_job_canceled_while_running_stops_and_ends_canceled(install, batching):
    inst = install(batching)
    rt = inst.runtime()
    job_id = inst.submit("block")
    thread = run_in_thread(rt, job_id, inst.good)
    try:
        assert inst.models.started.wait(10), "the job never reached the backend"
        assert inst.job(job_id).status == "running" and rt.running_ids() == [job_id]
        assert inst.cancel(job_id).ids("canceled") == [job_id]
        # The runtime tells the backend (``is_canceled``) within a few report intervals.
        assert inst.models.saw_cancel.wait(5), "the backend was never told of the cancel"
        thread.join(5)
        assert not thread.is_alive()
    finally:
        inst.models.release.set()
        thread.join(5)
    job = inst.job(job_id)
    assert job.status == "canceled" and job.output is None and job.error_code is None
    assert inst.objects(job_id) == [] and rt.running_ids() == []
    assert job.tokens_charged == 100  # canceled while running: the model's minimum
    # The worker is free for the next job.
    after = inst.submit("ok")
    rt.execute(after, inst.good, "normal")
    assert inst.job(after).status == "succeeded"


def test_a_result_that_arrives_after_the_cancel_is_dropped_unstored(install, batching, monkeypatch):
    inst = install(batching)
    rt = inst.runtime()
    puts: list[str] = []
    store = inst.services.store
    real_put = store.put
    monkeypatch.setattr(store, "put", lambda key, *a, **kw: (puts.append(key), real_put(key, *a, **kw))[1])
    job_id = inst.submit("late")
    thread = run_in_thread(rt, job_id, inst.good)
    try:
        assert inst.models.started.wait(10)
        inst.cancel(job_id)
        assert inst.models.saw_cancel.wait(5), "the backend was never told of the cancel"
        thread.join(5)
        assert not thread.is_alive()
    finally:
        inst.models.release.set()
        thread.join(5)
    job = inst.job(job_id)
    assert job.status == "canceled" and job.output is None and job.tokens_charged == 100
    assert puts == [] and inst.objects(job_id) == []  # never written, not written and deleted
    assert rt.running_ids() == []


def test_the_lease_is_renewed_while_a_job_runs_and_progress_is_written(install):
    lease_s = 2.0
    inst = install("batcher", lease_seconds=lease_s)
    rt = inst.runtime()
    job_id = inst.submit("block")
    thread = run_in_thread(rt, job_id, inst.good)
    try:
        assert inst.models.started.wait(10)
        first = aware(inst.job(job_id).lease_expires_at)
        started = time.monotonic()
        # Run for twice the lease: without renewals it lapses, and the runtime's own reaper
        # would queue the job again.
        while time.monotonic() - started < 2 * lease_s:
            job = inst.job(job_id)
            now = datetime.now(UTC)
            assert job.status == "running" and job.attempts == 1 and job.lease_owner == rt.name, job.status
            assert aware(job.lease_expires_at) > now, "the lease lapsed while the job ran"
            time.sleep(0.2)
        last = aware(inst.job(job_id).lease_expires_at)
        assert (last - first).total_seconds() >= lease_s
        assert inst.job(job_id).progress == 0.5  # the reporter wrote what the backend reported
    finally:
        inst.models.release.set()
        thread.join(10)
    job = inst.job(job_id)
    assert job.status == "succeeded" and job.attempts == 1 and job.lease_expires_at is None


def test_a_model_that_cannot_be_loaded_fails_its_jobs_and_the_worker_goes_on(install):
    inst = install("batcher")
    inst.models.broken.add(inst.broken)
    # Room for one model at a time: the good one loads at start, the broken one on demand.
    rt = inst.runtime([inst.good, inst.broken], budget_bytes=15, need_bytes={inst.good: 10, inst.broken: 10})
    assert inst.models.loads == [inst.good]
    job_id = inst.submit("ok", model=inst.broken)

    rt.execute(job_id, inst.broken, "normal")

    job = inst.job(job_id)
    assert job.status == "failed" and job.error_code == "model_load_failed", (job.status, job.error_code)
    assert "header truncated" in job.error_message
    assert job.tokens_charged == 0 and inst.ledger(job_id)[-1] == ("refund", 100, 0)
    assert inst.broken in rt.describe()["failed_models"]  # what its heartbeat tells admission
    # Within the cool-down the next job fails at once, without loading the model again.
    again = inst.submit("ok", model=inst.broken)
    rt.execute(again, inst.broken, "normal")
    assert inst.job(again).error_code == "model_load_failed"
    assert inst.models.loads == [inst.good, inst.broken]
    # The other model still serves (loaded again: it made room for the failed load).
    ok = inst.submit("ok")
    rt.execute(ok, inst.good, "normal")
    assert inst.job(ok).status == "succeeded"
    assert rt.state is State.READY


def test_a_resident_model_that_cannot_be_loaded_stops_the_worker_before_it_is_ready(install):
    inst = install("batcher")
    inst.models.broken.add(inst.good)
    with pytest.raises(JobError) as caught:
        inst.runtime()
    assert caught.value.code == "model_load_failed"
    assert inst.runtimes[-1].state is State.LOADING


def test_the_heartbeat_goes_on_while_a_database_duty_hangs(install, monkeypatch):
    """A reporter duty stuck on the database (a slow statement, a lock wait) must not let
    the heartbeat lapse: the API would take the worker's models for served by nobody."""
    from vramq.jobs import heartbeat

    monkeypatch.setattr(heartbeat, "TTL_S", 2)  # announced every 2/3 s, gone 2 s after the last
    hung, released = threading.Event(), threading.Event()

    def stuck_reap(self):
        hung.set()
        released.wait(30)

    monkeypatch.setattr(WorkerRuntime, "_reap", stuck_reap)
    inst = install("batcher")
    try:
        rt = inst.runtime()
        assert hung.wait(10), "the reporter never ran its reaping duty"
        key = heartbeat.PREFIX + rt.name
        deadline = time.monotonic() + 3 * heartbeat.TTL_S
        while time.monotonic() < deadline:
            assert inst.services.redis.exists(key), "the heartbeat lapsed while a database duty hung"
            time.sleep(0.1)
    finally:
        released.set()
