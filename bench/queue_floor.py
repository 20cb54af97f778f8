"""What the queue itself costs per job: N jobs of the echo model (no work) through the whole system.

Run from the repository root::

    .venv/bin/python bench/queue_floor.py [--jobs 2000] [--connections 16]
                                          [--database-url postgresql://postgres@127.0.0.1:5432/bench_floor]
                                          [--profile DIR]

What runs, as in production, each process started by ``jobs.proctree`` (``_common.Procs``):

* a ``redis-server`` of the benchmark's own (the embedded broker's binary and flags,
  ``jobs.embedded.ensure_redis``, in the work dir), so its CPU is this run's alone;
* ``vramq api`` (gunicorn, ``--api-workers`` processes x ``--api-threads`` threads);
* one ``vramq worker --cpu --models echo``: the echo model of the tiny catalog
  (``gpu_workers/backends/echo.py``) answers a text job with its prompt in microseconds,
  so everything measured is the queue's: HTTP, validation, admission, the INSERT and the
  publish, the broker, the worker taking the job (fair pick, lease), recording the
  outcome (state, ledger, events) and the commit;
* the database: SQLite in the work dir, or with ``--database-url`` a PostgreSQL database
  that is dropped and created empty first and dropped at the end (``--keep-db`` keeps it).

The caller is anonymous and unmetered (``_common.UNMETERED``); metering still runs (each
job reserves and settles its tokens). After ``--warmup`` jobs have been submitted and
have succeeded, ``--connections`` client threads (a keep-alive ``requests.Session``
each) send the N jobs (``POST /v1/jobs``, a 4-word prompt, ``max_tokens`` 16) as fast
as they are answered; the benchmark then polls the database (one ``count(*)`` every
``--poll-ms``, not one request per job) until all N have succeeded.

Figures:

* ``jobs_per_s``: N / (first POST sent -> the latest ``finished_at`` in the database),
  end to end; ``submit_jobs_per_s``: N / (first POST sent -> last 202 received);
  ``submit_p50_ms`` / ``submit_p99_ms``: the POSTs' latencies at the client;
  ``latency_ms_p50`` / ``latency_ms_p99``: each job's ``created_at -> finished_at``.
* ``cpu_ms_per_job``: user + system CPU (``/proc/<pid>/stat``) over the measured phase,
  divided by N, for ``api`` (the gunicorn master and its workers), ``worker`` (the worker
  process and its children), ``redis`` (the benchmark's redis-server), ``postgres`` (the
  backends serving the benchmark's database: the postmaster's children whose process
  title names it, sampled every 0.25 s so that backends that come and go are counted;
  0 on SQLite) and ``client`` (this process: the client threads and the polling).
  ``other_busy_cores`` is the rest of the machine over the phase: other users of a shared
  machine.

``--profile DIR`` also records the API (``--subprocesses``: the gunicorn workers) and
the worker with ``py-spy record --gil --format speedscope`` during the measured phase
(py-spy must be installed: the ``bench`` extra, ``pip install -e '.[bench]'``; it needs ptrace, e.g. root),
and writes ``DIR/api.speedscope.json``, ``DIR/worker.speedscope.json`` and
``DIR/top.json``: each process group's functions by own and by total share of the
samples, vramq's own functions by total share, the packages the time is spent in, and
``centers``: the process's time split without overlap among the parts of its work that
``CENTERS`` names. ``--gil`` samples only the thread holding the GIL, so the shares are
of Python's CPU time: waiting (for SQLite's write lock, the network, a condition) and C
code that lets the GIL go (SQLite's own work, psycopg waiting for the server) are not in
them. The sampling costs CPU: take the figures from a run without it.

Progress lines go to stderr; the last stdout line is one JSON object. No assertions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests
from _common import UNMETERED, CpuMeter, Procs, free_port, pct, tree_cpu_s, wait_ready

MODEL_ID = "echo"
TARGETS = {"jobs_per_s": 500.0, "api_cpu_ms_per_job": 2.0, "worker_cpu_ms_per_job": 2.0}
"""The issue's targets: at least 500 jobs/s end to end, at most 2 ms of CPU per job in
the API and in the worker."""
_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[queue_floor {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- PostgreSQL: the database, and its backends' CPU ------------------------------------------


def pg_admin(database_url: str) -> tuple[str, str]:
    """(URL of the server's ``postgres`` database, the benchmark database's name)."""
    base, _, name = database_url.rpartition("/")
    name = name.split("?", 1)[0]
    if not name or name == "postgres":
        raise SystemExit("--database-url must name a database of its own (it is dropped and created)")
    return f"{base}/postgres", name


def pg_recreate(database_url: str) -> None:
    import psycopg

    admin, name = pg_admin(database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def pg_drop(database_url: str) -> None:
    import psycopg

    admin, name = pg_admin(database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()


class PgBackends:
    """CPU of the PostgreSQL backends serving one database, on this machine.

    The backends are the postmaster's children whose process title (``postgres: user
    dbname host(port) state``) names the database. A thread samples them every
    ``every_s`` seconds and keeps each one's last reading, so a backend that ends between
    two samples loses at most one interval of its CPU. ``total()`` is the sum of the last
    readings of every backend ever seen; a difference of two totals is the CPU in between.
    """

    def __init__(self, database_url: str, every_s: float = 0.25):
        import psycopg

        _, self.name = pg_admin(database_url)
        with psycopg.connect(database_url) as conn:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.postmaster = int(_stat(backend)[1])  # ppid: fails when PostgreSQL is not local
        self.every_s = every_s
        self._last: dict[int, float] = {}
        self._titles: dict[int, bool] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.sample()
        threading.Thread(target=self._loop, name="pg-sampler", daemon=True).start()

    def _children(self) -> list[int]:
        kids: list[int] = []
        for task in os.listdir(f"/proc/{self.postmaster}/task"):
            with open(f"/proc/{self.postmaster}/task/{task}/children") as fh:
                kids.extend(int(c) for c in fh.read().split())
        return kids

    def _ours(self, pid: int) -> bool:
        known = self._titles.get(pid)
        if known is None:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    title = fh.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                return False
            known = self._titles[pid] = title.startswith("postgres: ") and f" {self.name} " in title
        return known

    def sample(self) -> None:
        readings = {}
        for pid in self._children():
            if self._ours(pid):
                try:
                    f = _stat(pid)
                    readings[pid] = (int(f[11]) + int(f[12])) / _TCK
                except (OSError, IndexError):
                    pass
        with self._lock:
            self._last.update(readings)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sample()
            except OSError:
                pass

    def total(self) -> float:
        self.sample()
        with self._lock:
            return sum(self._last.values())

    def stop(self) -> None:
        self._stop.set()


# --- the catalog ----------------------------------------------------------------------------


def write_catalog(path: Path, max_batch: int) -> None:
    """A catalog of the tiny catalog's echo entry alone, with another ``max_batch``."""
    import tomllib

    from vramq.jobs.catalog import TINY_CATALOG

    entry = next(m for m in tomllib.loads(TINY_CATALOG.read_text())["models"] if m["id"] == MODEL_ID)
    entry["max_batch"] = max_batch

    def value(v) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    path.write_text("[[models]]\n" + "".join(f"{k} = {value(v)}\n" for k, v in entry.items()))


# --- the client ---------------------------------------------------------------------------------


def submit_all(url: str, n: int, connections: int, tag: str) -> dict:
    """``n`` POSTs from ``connections`` threads, each with a keep-alive session."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: Counter = Counter()
    samples: list[str] = []
    last_answer = [0.0]
    headers = {"Content-Type": "application/json"}

    def client() -> None:
        http = requests.Session()
        mine: list[float] = []
        while (i := next(counter)) < n:
            body = json.dumps({"model": MODEL_ID, "input": {"prompt": f"{tag} job {i} echoed", "max_tokens": 16}})
            t0 = time.perf_counter()
            try:
                r = http.post(url + "/v1/jobs", data=body, headers=headers, timeout=60)
                code, text = r.status_code, r.text
            except requests.RequestException as exc:
                code, text = exc.__class__.__name__, str(exc)
            t1 = time.perf_counter()
            mine.append(t1 - t0)
            if code != 202:
                with lock:
                    errors[str(code)] += 1
                    if len(samples) < 3:
                        samples.append(text[:300])
        with lock:
            latencies.extend(mine)
            last_answer[0] = max(last_answer[0], time.perf_counter())

    threads = [threading.Thread(target=client, name=f"client-{k}") for k in range(connections)]
    t_first = time.time()
    p_first = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "t_first": t_first,
        "submit_s": last_answer[0] - p_first,
        "latencies": latencies,
        "errors": dict(errors),
        "error_samples": samples,
    }


class Jobs:
    """Counts in the database (the benchmark's own connection, outside the measured processes)."""

    def __init__(self, database_url: str):
        from vramq.jobs.db import make_engine, make_sessionmaker

        self.engine = make_engine(database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.backend_pid = None
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy import text

            with self.engine.connect() as conn:
                self.backend_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()

    def counts(self) -> dict[str, int]:
        from sqlalchemy import func, select

        from vramq.jobs.schema import Job

        with self.sessions() as s:
            return dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())

    def wait(self, total_done: int, poll_s: float, timeout_s: float, check_alive) -> dict[str, int]:
        """Until ``total_done`` jobs have ended (or one failed, or the time is up)."""
        deadline = time.monotonic() + timeout_s
        while True:
            c = self.counts()
            if c.get("succeeded", 0) + c.get("failed", 0) + c.get("canceled", 0) >= total_done:
                return c
            if c.get("failed") or time.monotonic() > deadline:
                raise RuntimeError(f"jobs did not all succeed within {timeout_s:.0f}s: {c}")
            check_alive()
            time.sleep(poll_s)

    def timeline(self, since) -> list[tuple]:
        from sqlalchemy import select

        from vramq.jobs.schema import Job

        with self.sessions() as s:
            return list(
                s.execute(
                    select(Job.created_at, Job.started_at, Job.finished_at).where(
                        Job.created_at >= since, Job.status == "succeeded"
                    )
                ).all()
            )


# --- profiling ---------------------------------------------------------------------------------


class Profiler:
    """``py-spy record`` attached to the API (and its gunicorn workers) and to the worker."""

    def __init__(self, outdir: Path, targets: dict[str, int], rate: int):
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(py_spy).exists():
            raise SystemExit("--profile needs py-spy (pip install py-spy==0.4.3)")
        outdir.mkdir(parents=True, exist_ok=True)
        self.outdir = outdir
        self.procs: dict[str, subprocess.Popen] = {}
        for name, pid in targets.items():
            out = outdir / f"{name}.speedscope.json"
            self.procs[name] = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--subprocesses",
                    "--gil",
                    "--rate",
                    str(rate),
                    "--format",
                    "speedscope",
                    "--output",
                    str(out),
                    "--nonblocking",
                ],
                stdout=open(outdir / f"{name}.py-spy.log", "wb"),
                stderr=subprocess.STDOUT,
            )
        time.sleep(2)  # attached before the phase starts
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"py-spy on {name} exited: {(outdir / f'{name}.py-spy.log').read_text()[-2000:]}")

    def stop(self) -> dict:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc in self.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        top = {name: summarize(self.outdir / f"{name}.speedscope.json", CENTERS.get(name)) for name in self.procs}
        (self.outdir / "top.json").write_text(json.dumps(top, indent=1))
        return top


def _short_file(file: str) -> str:
    """``vramq/jobs/submit.py``, ``sqlalchemy/engine/base.py``, ``threading.py``: the path
    from the package on."""
    if "/vramq/" in file:
        return "vramq/" + file.split("/vramq/", 1)[1]
    for package in ("jobs", "api", "gpu_workers", "storage"):  # an editable install: the repo's folders
        if file.startswith(f"{ROOT}/{package}/"):
            return "vramq/" + file[len(str(ROOT)) + 1 :]
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1]
    if "/lib/python3" in file:
        return file.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return file


#: Where each process's time goes, without overlap: a sample counts for the innermost
#: frame on its stack that one of these (label, file prefix, function names or None for
#: any) matches, else for "other". Keep them in step with the code they name.
CENTERS: dict[str, list[tuple[str, str, tuple[str, ...] | None]]] = {
    "api": [
        ("ledger.reserve (wallet lock, ledger row, totals)", "vramq/jobs/ledger.py", ("reserve", "reserve_many")),
        ("fairness.position (the 202's queue_position)", "vramq/jobs/fairness.py", ("position",)),
        ("render_job, the rest (job JSON, links)", "vramq/api/render.py", None),
        ("queue.publish (Celery send_task to Redis)", "vramq/jobs/queue.py", ("publish",)),
        ("check_job (validation, admission)", "vramq/jobs/submit.py", ("check_job", "parse_request")),
        ("check_available (served models)", "vramq/jobs/submit.py", ("check_available",)),
        ("submit_job, the rest (INSERT, commit, idempotency)", "vramq/jobs/submit.py", None),
        ("submit_job, the rest (INSERT, commit, idempotency)", "vramq/jobs/idempotency.py", None),
        ("create_job, the rest", "vramq/api/jobs_api.py", None),
        ("rate limit", "vramq/api/ratelimit.py", None),
        ("caller (keys, accounts)", "vramq/api/guards.py", None),
        ("caller (keys, accounts)", "vramq/jobs/accounts.py", None),
        ("metrics", "prometheus_client/", None),
        ("Flask and werkzeug", "flask/", None),
        ("Flask and werkzeug", "werkzeug/", None),
        ("gunicorn (HTTP, threads)", "gunicorn/", None),
        ("gunicorn (HTTP, threads)", "vramq/api/server.py", None),
    ],
    "worker": [
        ("ledger.settle", "vramq/jobs/ledger.py", ("settle",)),
        ("lifecycle.succeed (UPDATE the job)", "vramq/jobs/lifecycle.py", ("succeed",)),
        ("webhook outbox", "vramq/jobs/webhooks/", None),
        ("outcomes.end, the rest", "vramq/jobs/outcomes.py", None),
        ("_succeeded, the rest (store.list, tidying)", "vramq/gpu_workers/runtime.py", ("WorkerRuntime._succeeded",)),
        ("_end, the rest (transaction, events)", "vramq/gpu_workers/runtime.py", ("WorkerRuntime._end",)),
        ("fairness.pick", "vramq/jobs/fairness.py", ("pick",)),
        ("lifecycle.take (the lease UPDATE)", "vramq/jobs/lifecycle.py", ("take",)),
        ("fairness.take_next, the rest", "vramq/jobs/fairness.py", None),
        ("_hint_committed (SELECT the hint)", "vramq/gpu_workers/runtime.py", ("WorkerRuntime._hint_committed",)),
        (
            "execute, the rest (SELECT the job, run it)",
            "vramq/gpu_workers/runtime.py",
            ("WorkerRuntime.execute", "WorkerRuntime._run", "WorkerRuntime._compute"),
        ),
        ("the echo backend", "vramq/gpu_workers/backends/", None),
        ("EventWriter thread (XADD)", "vramq/jobs/events.py", None),
        (
            "reporter thread (leases, reaping, turns, heartbeat)",
            "vramq/gpu_workers/runtime.py",
            ("WorkerRuntime._report_loop",),
        ),
        ("Celery task tracing", "celery/app/trace.py", None),
        ("logging", "logging/", None),
        ("Celery and kombu (receive, ack, pool)", "celery/", None),
        ("Celery and kombu (receive, ack, pool)", "kombu/", None),
    ],
}


def summarize(path: Path, centers: list | None = None, n: int = 25) -> dict:
    """A speedscope file's functions (py-spy writes a frame per line: they are merged per
    function) by own share of the samples (the leaf: where the time is spent), by total
    share (anywhere on the stack, once per sample), vramq's own functions by total share,
    and the packages the time is spent in (the leaf's), over every profile in it (py-spy
    writes one per thread of each process)."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]
    files = [_short_file(f.get("file") or "") for f in frames]
    func = [f"{f['name']} ({files[i]})" if files[i] else f["name"] for i, f in enumerate(frames)]

    def package(i: int) -> str:
        file = files[i]
        if file.startswith("vramq/"):
            return ".".join(file.split("/")[:2])
        if "/" in file:
            return file.split("/", 1)[0]
        return file.removesuffix(".py") or "(native)"

    def center(i: int) -> str | None:
        name, file = frames[i]["name"], files[i]
        return next(
            (
                label
                for label, prefix, names in centers or []
                if file.startswith(prefix) and (names is None or name in names)
            ),
            None,
        )

    centered = [center(i) for i in range(len(frames))]
    own: Counter = Counter()
    total: Counter = Counter()
    packages: Counter = Counter()
    flat: Counter = Counter()
    samples = 0.0
    for prof in doc["profiles"]:
        for stack, weight in zip(prof["samples"], prof["weights"], strict=True):
            samples += weight
            if stack:
                own[func[stack[-1]]] += weight
                packages[package(stack[-1])] += weight
            for name in {func[i] for i in stack}:
                total[name] += weight
            flat[next((centered[i] for i in reversed(stack) if centered[i]), "other")] += weight

    def shares(c: Counter, keep=lambda name: True) -> list:
        return [(name, round(w / samples, 4)) for name, w in c.most_common() if keep(name)][:n]

    return {
        "samples_s": round(samples, 2),
        "own": shares(own),
        "total": shares(total),
        "vramq_total": shares(total, lambda name: "(vramq/" in name),
        "own_by_package": shares(packages),
        "centers": shares(flat),
    }


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--jobs", type=int, default=2000, help="jobs measured (figures for the record: at least 2000)")
    ap.add_argument("--warmup", type=int, default=200, help="jobs run to the end before the measurement")
    ap.add_argument("--connections", type=int, default=16, help="client threads, a keep-alive connection each")
    ap.add_argument("--api-workers", type=int, default=2, help="gunicorn processes")
    ap.add_argument("--api-threads", type=int, default=8, help="threads per gunicorn process")
    ap.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="the echo model's max_batch (its worker's task threads); default: the tiny catalog's",
    )
    ap.add_argument(
        "--database-url",
        default=None,
        help="default: SQLite in the work dir; postgresql://…/NAME: that database is dropped and created",
    )
    ap.add_argument("--keep-db", action="store_true", help="do not drop the PostgreSQL database at the end")
    ap.add_argument("--poll-ms", type=float, default=200, help="how often the database is asked how many are done")
    ap.add_argument("--timeout", type=float, default=900, help="seconds the N jobs may take")
    ap.add_argument("--profile", type=Path, default=None, help="record the api and the worker with py-spy into DIR")
    ap.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--workdir", type=Path, default=None, help="keep data and logs here (default: a temp dir, removed)")
    args = ap.parse_args()
    if args.jobs < 2000:
        log(f"WARNING: {args.jobs} jobs; figures for the record use at least 2000")

    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="vramq-floor-")) if own_tmp else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    procs = redis_proc = pg = jobs = None
    postgres = bool(args.database_url and args.database_url.startswith("postgres"))
    try:
        from vramq.jobs.embedded import ensure_redis, stop_redis

        data = work / "data"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        if postgres:
            pg_recreate(args.database_url)
        database_url = args.database_url or f"sqlite:///{data / 'vramq.db'}"
        broker_url, redis_proc = ensure_redis(data)  # the embedded broker: our own redis-server
        env = {
            "VRAMQ_DATA_DIR": str(data),
            "VRAMQ_BROKER_URL": broker_url,
            "VRAMQ_DATABASE_URL": database_url,
            "VRAMQ_MODELS_DIR": str(work / "no-models"),
            "VRAMQ_SECRET_KEY": "bench-" + uuid.uuid4().hex,
            **UNMETERED,
        }
        if args.max_batch:
            write_catalog(work / "echo.toml", args.max_batch)
            env["VRAMQ_CATALOG"] = str(work / "echo.toml")
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        procs = Procs(env, logs, log)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        api = procs.spawn(
            "api", ["api", "--port", str(port), "--workers", str(args.api_workers), "--threads", str(args.api_threads)]
        )
        wait_ready(url, procs, None)  # migrated before the worker starts
        worker = procs.spawn("worker", ["worker", "--cpu", "--models", MODEL_ID])
        wait_ready(url, procs, worker.pid)
        log(
            f"vramq ready at {url}: api {args.api_workers}x{args.api_threads}, worker pid {worker.pid}, "
            f"{'PostgreSQL' if postgres else 'SQLite'}, redis {broker_url}"
        )

        jobs = Jobs(database_url)
        warm = submit_all(url, args.warmup, args.connections, "warm")
        if warm["errors"]:
            raise RuntimeError(f"warm-up: {warm['errors']} {warm['error_samples']}")
        jobs.wait(args.warmup, args.poll_ms / 1000, args.timeout, procs.check_alive)
        log(f"warmed up: {args.warmup} jobs")

        parts = {
            "client": time.process_time,
            "api": lambda: tree_cpu_s(api.pid),
            "worker": lambda: tree_cpu_s(worker.pid),
            "redis": lambda: tree_cpu_s(redis_proc.pid),
        }
        if postgres:
            try:
                pg = PgBackends(database_url)
                parts["postgres"] = pg.total
            except Exception as exc:
                log(f"no CPU figure for PostgreSQL (not on this machine?): {exc}")
        meter = CpuMeter(parts)
        profiler = (
            Profiler(args.profile, {"api": api.pid, "worker": worker.pid}, args.profile_rate) if args.profile else None
        )

        from vramq.jobs.lifecycle import utcnow

        since = utcnow()
        load_before = os.getloadavg()[0]
        a = meter.sample()
        sub = submit_all(url, args.jobs, args.connections, "floor")
        log(f"{args.jobs} jobs submitted in {sub['submit_s']:.2f}s ({sum(sub['errors'].values())} errors)")
        counts = jobs.wait(
            args.warmup + args.jobs - sum(sub["errors"].values()), args.poll_ms / 1000, args.timeout, procs.check_alive
        )
        b = meter.sample()
        top = profiler.stop() if profiler else None
        cpu = CpuMeter.delta(a, b)

        tl = jobs.timeline(since)
        last_done = max(f for _c, _s, f in tl).timestamp()
        e2e_s = last_done - sub["t_first"]
        done = len(tl)
        per_job = {k: round((b[k] - a[k]) * 1000 / args.jobs, 3) for k in parts}
        per_job.setdefault("postgres", 0.0 if not postgres else None)
        result = {
            "jobs": args.jobs,
            "succeeded": done,
            "errors": sub["errors"],
            "database": "postgres" if postgres else "sqlite",
            "jobs_per_s": round(done / e2e_s, 1),
            "submit_jobs_per_s": round(args.jobs / sub["submit_s"], 1),
            "submit_p50_ms": round(pct(sub["latencies"], 50) * 1000, 2),
            "submit_p99_ms": round(pct(sub["latencies"], 99) * 1000, 2),
            "latency_ms_p50": round(pct([(f - c).total_seconds() for c, _s, f in tl], 50) * 1000, 2),
            "latency_ms_p99": round(pct([(f - c).total_seconds() for c, _s, f in tl], 99) * 1000, 2),
            "e2e_s": round(e2e_s, 3),
            "submit_s": round(sub["submit_s"], 3),
            "cpu_ms_per_job": per_job,
            "busy_cores": {k: round((b[k] - a[k]) / (b["wall"] - a["wall"]), 2) for k in parts},
            "machine_busy_cores": cpu["machine_busy_cores"],
            "other_busy_cores": cpu["other_busy_cores"],
            "cores": os.cpu_count(),
            "load_avg_1m_before": round(load_before, 2),
            "connections": args.connections,
            "api_workers": args.api_workers,
            "api_threads": args.api_threads,
            "max_batch": args.max_batch,
            "statuses": counts,
            "profiled": bool(profiler),
            "targets": TARGETS,
            "meets_targets": {
                "jobs_per_s": done / e2e_s >= TARGETS["jobs_per_s"],
                "api_cpu_ms_per_job": per_job["api"] <= TARGETS["api_cpu_ms_per_job"],
                "worker_cpu_ms_per_job": per_job["worker"] <= TARGETS["worker_cpu_ms_per_job"],
            },
        }
        if top:
            log(
                f"profiles in {args.profile}: "
                + ", ".join(f"{k} {v['samples_s']} s of samples" for k, v in top.items())
            )
        if sub["error_samples"]:
            log(f"error samples: {sub['error_samples']}")
        if result["other_busy_cores"] > 0.25:
            log(f"WARNING: other processes kept {result['other_busy_cores']} cores busy; the figures are disturbed")
        print(json.dumps(result), flush=True)
        return 0
    finally:
        if pg is not None:
            pg.stop()
        if jobs is not None:
            jobs.engine.dispose()
        if procs is not None:
            left = procs.stop()
            log("vramq processes stopped" + (f"; still alive: {left}" if left else ""))
        if redis_proc is not None:
            stop_redis(redis_proc)
        if postgres and not args.keep_db:
            try:
                pg_drop(args.database_url)
            except Exception as exc:
                log(f"could not drop the benchmark database: {exc}")
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
