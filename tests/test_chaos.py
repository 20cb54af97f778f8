"""Chaos soak, bounded to about three minutes: a 500-job image batch while workers are
SIGKILLed (with every child) every few seconds and started again, Redis is restarted once
and PostgreSQL is restarted once.

Own PostgreSQL (initdb in a temp dir, its own port), own Redis (append-only, so queues
survive its restart), local object store; ``vramq api``, ``vramq webhooks-and-batches``
(it finishes batches) and two ``vramq worker --cpu --models tiny-flux`` that the test manages.

At the end: every job in exactly one terminal state, none queued or running; each
succeeded job with exactly one set of outputs; the ledger balanced to the token; the
batch finished with a manifest listing each job once; and no process left behind (each
carries ``VRAMQ_TEST_TREE=<uuid>`` in its environment; ``/proc`` is searched for it).
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from tests.conftest import require, settings_env
from tests.fixtures.invariants import check_jobs_ended_once, check_ledger, jobs_of
from tests.fixtures.pgserver import PgServer
from tests.fixtures.pgserver import available as pg_available
from tests.fixtures.procs import Cluster
from tests.fixtures.services import services_for, start_redis
from tests.fixtures.slow_image import SLOW_CATALOG
from vramq.jobs.lifecycle import TERMINAL, utcnow
from vramq.jobs.schema import Job
from vramq.jobs.settings import Settings

pytestmark = pytest.mark.e2e

JOBS = 500
LEASE_S = 3
INPUT = {"prompt": "chaos", "width": 64, "height": 64, "steps": 2}
#: The chaos phase: a worker killed every KILL_EVERY_S seconds, Redis restarted at
#: REDIS_AT_S, PostgreSQL at PG_AT_S, all over after CHAOS_S (or when the batch is done).
CHAOS_S = 60
KILL_EVERY_S = 5
REDIS_AT_S = 15
PG_AT_S = 35
#: After the chaos, the batch has this long to finish.
DRAIN_S = 90


def installation(stack: ExitStack, tmp_path, models_dir, **settings) -> tuple[PgServer, object, Cluster]:
    """A PostgreSQL and a Redis of the test's own (each restartable) and a ``Cluster`` on
    them, all stopped when ``stack`` closes."""
    pg = PgServer()
    stack.callback(pg.destroy)
    pg.start()
    database_url = pg.create_database("vramq")
    broker = start_redis(tmp_path / "redis")
    stack.callback(broker.stop)
    env = settings_env(tmp_path, redis_url=broker.url, models_dir=models_dir, database_url=database_url, **settings)
    cluster = Cluster(env=env, workdir=tmp_path)
    stack.callback(cluster.stop)
    return pg, broker, cluster


def test_a_batch_survives_killed_workers_and_restarted_broker_and_database(process_tree, tmp_path, models_dir):
    why = pg_available()
    require(why is None, why or "")
    t0 = time.monotonic()
    log = []

    def note(what: str) -> None:
        log.append(f"{time.monotonic() - t0:6.1f}s {what}")
        print(log[-1], flush=True)

    with ExitStack() as stack:
        pg, broker, cluster = installation(stack, tmp_path, models_dir, lease_seconds=LEASE_S, max_attempts=20)
        env = cluster.env
        cluster.start_api()
        cluster._spawn("dispatcher", ["webhooks-and-batches"])  # the dispatcher finishes batches
        slots = [cluster.start_worker(models="tiny-flux", wait=False) for _ in range(2)]
        services = services_for(Settings.from_env(env), migrate_db=False)
        stack.callback(services.engine.dispose)

        def ready_pids() -> set[int]:
            try:
                return {w["pid"] for w in cluster.workers() if w["state"] == "ready"}
            except (requests.RequestException, ValueError, KeyError):
                return set()  # the API answers 5xx while the broker or the database is down

        deadline = time.monotonic() + 120
        while not {p.popen.pid for p in slots} <= ready_pids():
            assert time.monotonic() < deadline, "\n".join(p.tail() for p in slots)
            assert all(p.popen.poll() is None for p in slots), "\n".join(p.tail() for p in slots)
            time.sleep(0.2)
        note("two workers ready")

        account = cluster.post("/v1/accounts", json={"name": "chaos"}).json()
        auth = {"Authorization": f"Bearer {account['api_key']}"}
        lines = [{"custom_id": f"c-{i:04d}", "model": "tiny-flux", "input": {**INPUT, "seed": i}} for i in range(JOBS)]
        resp = cluster.post("/v1/batches", json={"jobs": lines}, headers=auth)
        assert resp.status_code == 202, resp.text
        batch_id = resp.json()["id"]
        note(f"batch {batch_id} of {JOBS} submitted")

        def status_counts() -> dict[str, int]:
            with services.sessions() as s:
                return dict(
                    s.execute(
                        select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
                    ).all()
                )

        overdue = {"max": 0.0}

        def sample_overdue() -> None:
            """How long past its lease the most overdue running job is: lapsed leases must be
            reaped by whichever worker is alive, so this stays short."""
            try:
                with services.sessions() as s:
                    oldest = s.execute(
                        select(func.min(Job.lease_expires_at)).where(Job.batch_id == batch_id, Job.status == "running")
                    ).scalar()
            except Exception:  # the database is restarting
                return
            if oldest is not None:
                overdue["max"] = max(overdue["max"], (utcnow() - oldest).total_seconds())

        def batch_open() -> bool:
            try:
                return sum(n for st, n in status_counts().items() if st not in TERMINAL) > 0
            except Exception:  # the database is restarting
                return True

        # --- chaos -----------------------------------------------------------------------
        chaos_start = time.monotonic()
        next_kill, kills, redis_done, pg_done = chaos_start + KILL_EVERY_S, 0, False, False
        victim = 0
        while time.monotonic() - chaos_start < CHAOS_S and batch_open():
            sample_overdue()
            now = time.monotonic() - chaos_start
            if not redis_done and now >= REDIS_AT_S:
                broker.stop()
                broker.start()
                redis_done = True
                note(f"Redis restarted; jobs by status {status_counts()}")
            if not pg_done and now >= PG_AT_S:
                pg.stop("fast")
                pg.start()
                pg_done = True
                note(f"PostgreSQL restarted; jobs by status {status_counts()}")
            if time.monotonic() >= next_kill:
                proc = slots[victim]
                if proc.popen.pid in ready_pids():  # a worker at work, not one still loading
                    proc.kill_group()
                    kills += 1
                    slots[victim] = cluster.start_worker(models="tiny-flux", wait=False)
                    note(f"killed worker {proc.popen.pid} (slot {victim}), started {slots[victim].popen.pid}")
                    victim = 1 - victim
                    next_kill = time.monotonic() + KILL_EVERY_S
                else:
                    next_kill = time.monotonic() + 0.5
            time.sleep(0.1)
        note(
            f"chaos over: {kills} workers killed, Redis restarted {redis_done}, PostgreSQL restarted {pg_done}; "
            f"jobs by status {status_counts()}"
        )
        assert kills >= 3 and (redis_done and pg_done or not batch_open()), log

        # --- the batch ends, and finishes ----------------------------------------------------
        deadline = time.monotonic() + DRAIN_S
        while True:
            batch = cluster.get(f"/v1/batches/{batch_id}", headers=auth).json()
            if batch.get("results_url"):
                break
            if time.monotonic() > deadline:
                with services.sessions() as s:
                    stuck = s.execute(
                        select(Job.id, Job.status, Job.lease_owner, Job.lease_expires_at, Job.attempts).where(
                            Job.batch_id == batch_id, Job.status.not_in(TERMINAL)
                        )
                    ).all()
                pytest.fail(
                    f"batch not finished {DRAIN_S}s after the chaos: {batch.get('counts')}; not ended: "
                    f"{stuck[:10]}\n"
                    + "\n".join(log)
                    + "\n"
                    + "\n".join(f"--- {p.name} ---\n{p.tail(2500)}" for p in cluster.procs[-4:])
                )
            for proc in slots:  # a worker that died by itself is a finding, not chaos
                assert proc.popen.poll() is None, f"worker {proc.popen.pid} exited by itself:\n{proc.tail()}"
            sample_overdue()
            time.sleep(0.5)
        note(
            f"batch finished: {batch['status']} {batch['counts']}; a running job was at most "
            f"{overdue['max']:.1f}s past its lease"
        )
        assert overdue["max"] < 20, f"a running job went {overdue['max']:.1f}s past its lease without being reaped"

        # --- what must hold ------------------------------------------------------------------
        jobs = jobs_of(services, batch_id=batch_id)
        assert len(jobs) == JOBS
        by_status = {st: sum(j.status == st for j in jobs) for st in {j.status for j in jobs}}
        assert set(by_status) <= TERMINAL, by_status  # none queued, none running (past its lease or not)
        now = utcnow()
        assert not [j.id for j in jobs if j.lease_expires_at and j.lease_expires_at < now - timedelta(seconds=1)]
        failed = [(j.id, j.error_code, j.attempts) for j in jobs if j.status == "failed"]
        assert by_status.get("succeeded", 0) >= JOBS * 0.95, (by_status, failed[:10])
        # The only failure this chaos may cause: a job whose worker died with it MAX_ATTEMPTS times.
        assert all(code == "worker_lost" for _, code, _ in failed), failed[:10]
        assert batch["status"] == "completed" and batch["counts"]["total"] == JOBS
        assert all(batch["counts"][st] == by_status.get(st, 0) for st in TERMINAL), (batch["counts"], by_status)
        assert check_jobs_ended_once(services, jobs) == []
        assert check_ledger(services, account["account_id"], jobs) == []
        manifest = [json.loads(x) for x in requests.get(batch["results_url"], timeout=30).text.splitlines()]
        assert sorted(m["custom_id"] for m in manifest) == [f"c-{i:04d}" for i in range(JOBS)]
        assert {m["job_id"]: m["status"] for m in manifest} == {j.id: j.status for j in jobs}
        retried = sorted(j.attempts for j in jobs if j.attempts > 1)
        note(
            f"{by_status}; {len(retried)} jobs ran more than once (most attempts {max(retried, default=1)}); "
            f"failed: {failed[:5]}"
        )

    # Everything the test started has exited: API, dispatcher, workers (and every process
    # they started), Redis, PostgreSQL.
    left = process_tree.wait_gone()
    assert left == [], process_tree.describe(left)
    note("no process left")


# --- a crash at the worst moment, made deterministic -----------------------------------------

ONE_AT_A_TIME_CATALOG = SLOW_CATALOG.replace("max_batch = 4", "max_batch = 1")


class OutputsLost(AssertionError):
    """A job recorded as succeeded whose outputs are gone from the store."""


def test_a_success_whose_commit_answer_is_lost_keeps_its_outputs(process_tree, tmp_path, models_dir):
    """The database applies the worker's COMMIT of a success, and the connection dies
    before the worker hears so (a database crash or failover at that instant). Made
    deterministic with synchronous replication to a standby that does not exist: every
    COMMIT is applied locally, then waits; the success's backend is terminated while it
    waits (its transaction stays committed), and the worker sees its connection lost."""
    import psycopg

    why = pg_available()
    require(why is None, why or "")
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(ONE_AT_A_TIME_CATALOG.format(weights=models_dir / "tiny-flux"))
    with ExitStack() as stack:
        pg, broker, cluster = installation(stack, tmp_path, models_dir, catalog=catalog, lease_seconds=30)
        env, database_url = cluster.env, cluster.env["VRAMQ_DATABASE_URL"]
        admin = psycopg.connect(database_url, autocommit=True)
        stack.callback(admin.close)

        def commits_wait(on: bool) -> None:
            if on:
                admin.execute("ALTER SYSTEM SET synchronous_commit = 'on'")
                admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'vramq_test_no_such_standby'")
            else:
                admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
                admin.execute("ALTER SYSTEM RESET synchronous_commit")
            admin.execute("SELECT pg_reload_conf()")

        def commits_go_on() -> None:  # before the processes stop: nothing may hang on a commit
            try:
                commits_wait(False)
            except psycopg.Error:
                pass

        stack.callback(commits_go_on)
        cluster.start_api()
        cluster.start_worker(models="tiny-flux")
        job = cluster.post(
            "/v1/jobs", json={"model": "tiny-flux", "input": {"prompt": "x", "width": 256, "height": 256, "steps": 60}}
        ).json()
        deadline = time.monotonic() + 60
        while cluster.get(f"/v1/jobs/{job['id']}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        commits_wait(True)

        # Every COMMIT now waits after it is applied. The reporter's (progress, leases) are
        # let go as they come; the success's is the one that has written the ledger.
        deadline = time.monotonic() + 60
        while True:
            waiting = admin.execute(
                "SELECT a.pid, a.pid IN (SELECT pid FROM pg_locks WHERE relation = 'ledger'::regclass) "
                "FROM pg_stat_activity a WHERE a.wait_event = 'SyncRep'"
            ).fetchall()
            success = [pid for pid, settles in waiting if settles]
            for pid, _ in waiting:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            if success:
                break
            assert time.monotonic() < deadline, "the success never committed"
            time.sleep(0.02)
        commits_wait(False)

        done = cluster.wait_job(job["id"], timeout=60)
        time.sleep(3)  # the worker's retry, and whatever it does after it
        done = cluster.get(f"/v1/jobs/{job['id']}").json()
        objects = Path(env["VRAMQ_DATA_DIR"]) / "objects" / "jobs" / job["id"]
        files = (
            sorted(p.relative_to(objects).as_posix() for p in objects.rglob("*") if p.is_file())
            if objects.exists()
            else []
        )
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        assert done["usage"]["tokens_charged"] > 0  # settled once, in the committed transaction
        if files != ["1/image-0.png"]:
            link = done["output"]["images"][0]["url"]
            said = [line for line in cluster.procs[-1].tail(200_000).splitlines() if "vramq." in line][-6:]
            raise OutputsLost(
                f"{job['id']} succeeded; the store holds {files}; its link answers "
                f"{requests.get(link, timeout=10).status_code}; the worker said:\n" + "\n".join(said)
            )
        assert requests.get(done["output"]["images"][0]["url"], timeout=10).status_code == 200

    left = process_tree.wait_gone()
    assert left == [], process_tree.describe(left)
