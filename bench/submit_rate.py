"""How many ``POST /v1/jobs`` per second the API accepts, with no worker running.

Run from the repository root::

    .venv/bin/python bench/submit_rate.py [--client auto|wrk|python] [--connections 16]
                                          [--count 3000 | --duration 10]
                                          [--database-url postgresql://...]

What is measured: a real ``python -m api.cli api --workers 2 --threads 8`` (gunicorn,
gthread) on a temporary data dir (SQLite, or ``--database-url``), a Redis database
flushed first (``--redis``, default db 15) and a catalog with one image model. No worker
runs, so every accepted job stays queued: this is the cost of accepting a job
(validation, the INSERT, the publish to Redis, the COMMIT, the 202 response), nothing
else. After a short warm-up, C concurrent keep-alive connections send the same valid
small image job (64x64, 1 step) as fast as they can.

* ``wrk`` client (used when ``wrk`` is installed, ``--client auto``): one wrk thread
  (``--wrk-threads``) with C connections and a Lua script that posts the body and counts
  202 answers; wrk runs for a fixed time (``--duration``, default 10 s), since it cannot
  stop at a count.
* ``python`` client: C threads, one ``requests.Session`` each, until ``--count``
  requests (default 3000) or ``--duration`` seconds. On a 2-core machine this client
  competes with the server for CPU (and for its own GIL); ``client_busy_cores`` in the
  result says how much it used, and a warning says when it was likely the bottleneck.

Only 202 answers count as accepted (``jobs_per_s = accepted / seconds``); anything else
(other statuses, connection errors, timeouts) is an error. ``p50_ms``/``p99_ms`` are the
clients' request latencies. ``jobs_in_db`` checks the accepted count against the rows
in the database. ``jobs_in_db`` may exceed ``accepted`` by up to C: requests
still in flight when wrk stops are committed but not counted. The busy cores of the
client, the API processes, Redis and (when local) all of PostgreSQL over the run, and
of the whole machine (``other_busy_cores``: everything else, e.g. other users of a
shared machine), show where the CPU went.

Progress lines go to stderr; the last stdout line is one JSON object. No assertions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests
from _common import UNMETERED, announce_loading_worker, free_port, pct

from vramq.jobs import proctree

MODEL_ID = "bench-flux"
BODY = {
    "model": MODEL_ID,
    "input": {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 1, "seed": 7},
}


def log(msg: str) -> None:
    print(f"[submit_rate {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- CPU accounting ------------------------------------------------------------------

_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / _TCK


def postgres_pid(database_url: str) -> int | None:
    """The postmaster's pid when PostgreSQL runs on this machine (its backends are its children)."""
    try:
        import psycopg

        with psycopg.connect(database_url.replace("+psycopg", "")) as conn:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        with open(f"/proc/{backend}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except Exception:
        return None


def tree_cpu_s(pid: int) -> float:
    """user+system CPU seconds of a process and its live descendants (0 if gone)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TCK
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total


# --- set-up ---------------------------------------------------------------------------


def write_catalog(path: Path) -> None:
    # The API never loads weights, so the path need not exist.
    path.write_text(
        f"""[[models]]
id = "{MODEL_ID}"
kind = "image"
backend = "diffusers"
weights = {json.dumps(str(path.parent / "no-weights"))}
dtype = "float32"
max_batch = 4
max_wait_ms = 10
limits = {{ max_width = 1024, max_height = 1024, min_side = 32, size_multiple = 16, max_steps = 50, max_num_images = 4 }}
defaults = {{ width = 64, height = 64, steps = 1, guidance = 0.0, num_images = 1 }}
"""
    )


def start_api(env: dict[str, str], logdir: Path, workers: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log_path = logdir / "api.log"
    with open(log_path, "wb") as out:  # the child keeps its own copy of the descriptor
        # Its own process group, bound to die with this benchmark (jobs.proctree).
        proc = proctree.spawn(
            [
                sys.executable,
                "-m",
                "vramq.api.cli",
                "api",
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--threads",
                str(threads),
            ],
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"api exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError("api not ready within 120s")


def stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM, then after 30 s SIGKILL to its whole process group (gunicorn's workers too)."""
    if proc is not None:
        proctree.terminate_all([proc], 30)


# --- clients ----------------------------------------------------------------------------


def run_python(url: str, connections: int, count: int | None, duration: float | None) -> dict:
    """C threads, a keep-alive Session each, until ``count`` requests or ``duration`` s."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    stats = {"accepted": 0, "errors": 0}
    statuses: dict[str, int] = {}
    sample: list[str] = []
    payload = json.dumps(BODY)
    headers = {"Content-Type": "application/json"}
    start = time.perf_counter()
    deadline = start + duration if duration else None

    def worker() -> None:
        http = requests.Session()
        mine: list[float] = []
        acc = err = 0
        while True:
            if deadline is not None:
                if time.perf_counter() >= deadline:
                    break
            elif next(counter) >= count:
                break
            t0 = time.perf_counter()
            try:
                r = http.post(url + "/v1/jobs", data=payload, headers=headers, timeout=30)
                code = r.status_code
            except requests.RequestException as exc:
                code, r = exc.__class__.__name__, None
            mine.append(time.perf_counter() - t0)
            if code == 202:
                acc += 1
            else:
                err += 1
                with lock:
                    statuses[str(code)] = statuses.get(str(code), 0) + 1
                    if len(sample) < 3 and r is not None:
                        sample.append(r.text[:300])
        with lock:
            latencies.extend(mine)
            stats["accepted"] += acc
            stats["errors"] += err

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {
        **stats,
        "seconds": seconds,
        "p50_ms": pct(latencies, 50) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
        "error_statuses": statuses,
        "error_samples": sample,
    }


WRK_LUA = r"""
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  accepted = 0
  errors = 0
  last_error = 0
end

function response(status, headers, body)
  if status == 202 then
    accepted = accepted + 1
  else
    errors = errors + 1
    last_error = status
  end
end

function done(summary, latency, requests)
  local acc, err, last = 0, 0, 0
  for _, t in ipairs(threads) do
    acc = acc + t:get("accepted")
    err = err + t:get("errors")
    if t:get("last_error") ~= 0 then last = t:get("last_error") end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"accepted": %%d, "http_errors": %%d, "last_error_status": %%d, "requests": %%d, "duration_us": %%d, ' ..
    '"socket_errors": %%d, "p50_us": %%d, "p99_us": %%d}\n',
    acc, err, last, summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(url: str, connections: int, threads: int, duration: float, workdir: Path) -> dict:
    script = workdir / "post.lua"
    script.write_text(WRK_LUA % {"body": json.dumps(json.dumps(BODY))})
    cmd = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(duration))}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        url + "/v1/jobs",
    ]
    log("running: " + " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("WRKJSON "))
    r = json.loads(line[len("WRKJSON ") :])
    # Requests wrk sent but saw no answer to (socket errors) are errors too.
    errors = r["http_errors"] + r["socket_errors"]
    return {
        "accepted": r["accepted"],
        "errors": errors,
        "seconds": r["duration_us"] / 1e6,
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "error_statuses": {str(r["last_error_status"]): r["http_errors"]} if r["http_errors"] else {},
        "wrk_requests": r["requests"],
    }


def count_jobs(database_url: str) -> int | None:
    try:
        from sqlalchemy import text

        from vramq.jobs.db import make_engine

        engine = make_engine(database_url)
        with engine.connect() as conn:
            n = conn.execute(text("SELECT count(*) FROM jobs")).scalar_one()
        engine.dispose()
        return n
    except Exception as exc:
        log(f"could not count jobs in the database: {exc}")
        return None


# --- main ---------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--client", choices=["auto", "wrk", "python"], default="auto", help="auto: wrk when installed")
    ap.add_argument(
        "--connections",
        "--threads",
        dest="connections",
        type=int,
        default=16,
        help="concurrent connections (python: client threads)",
    )
    ap.add_argument("--count", type=int, default=3000, help="python client: requests to send")
    ap.add_argument("--duration", type=float, default=None, help="seconds to run instead of a count (wrk: default 10)")
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=200, help="requests before the measurement")
    ap.add_argument("--api-workers", type=int, default=2, help="gunicorn processes")
    ap.add_argument("--api-threads", type=int, default=8, help="threads per gunicorn process")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="broker URL; this Redis database is FLUSHED")
    ap.add_argument(
        "--database-url",
        default=None,
        help="default: SQLite in the work dir; e.g. postgresql://postgres@127.0.0.1:5432/bench (an empty database)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="keep data and logs here (default: a temp dir, removed)")
    args = ap.parse_args()

    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    elif client == "wrk" and not shutil.which("wrk"):
        ap.error("wrk is not installed (apt-get install wrk)")

    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="vramq-submit-")) if own_tmp else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    api = None
    try:
        import redis

        broker = redis.Redis.from_url(args.redis)
        broker.flushdb()
        redis_pid = broker.info("server").get("process_id")
        data = work / "data"
        shutil.rmtree(data, ignore_errors=True)
        catalog = work / "bench-catalog.toml"
        write_catalog(catalog)
        database_url = args.database_url or f"sqlite:///{data / 'vramq.db'}"
        env = {
            "VRAMQ_DATA_DIR": str(data),
            "VRAMQ_CATALOG": str(catalog),
            "VRAMQ_BROKER_URL": args.redis,
            "VRAMQ_DATABASE_URL": database_url,
            "VRAMQ_SECRET_KEY": "bench-" + uuid.uuid4().hex,
            **UNMETERED,
        }
        api, url = start_api(env, work, args.api_workers, args.api_threads)
        log(f"api ready at {url} ({args.api_workers} processes x {args.api_threads} threads)")
        announce_loading_worker(broker, [MODEL_ID])  # no worker runs, but the model is admitted

        warm = run_python(url, min(args.connections, 16), args.warmup, None)
        if warm["accepted"] != args.warmup:
            raise RuntimeError(f"warm-up: only {warm['accepted']} of {args.warmup} accepted: {warm['error_samples']}")
        before_db = count_jobs(database_url)

        load_before = os.getloadavg()[0]
        pg_pid = postgres_pid(database_url) if database_url.startswith("postgres") else None
        cpu_a = {
            "client": time.process_time(),
            "api": tree_cpu_s(api.pid),
            "redis": tree_cpu_s(redis_pid) if redis_pid else 0.0,
            "postgres": tree_cpu_s(pg_pid) if pg_pid else 0.0,
            "machine": machine_busy_s(),
        }
        wall_a = time.monotonic()
        if client == "wrk":
            # wrk is a child process: its CPU is read from its rusage afterwards.
            ru0 = os.times()
            r = run_wrk(url, args.connections, args.wrk_threads, args.duration or 10.0, work)
            ru1 = os.times()
            client_cpu = (ru1.children_user - ru0.children_user) + (ru1.children_system - ru0.children_system)
        else:
            r = run_python(url, args.connections, None if args.duration else args.count, args.duration)
            client_cpu = time.process_time() - cpu_a["client"]
        wall = time.monotonic() - wall_a
        api_cpu = tree_cpu_s(api.pid) - cpu_a["api"]
        redis_cpu = (tree_cpu_s(redis_pid) - cpu_a["redis"]) if redis_pid else 0.0
        pg_cpu = (tree_cpu_s(pg_pid) - cpu_a["postgres"]) if pg_pid else 0.0
        machine = machine_busy_s() - cpu_a["machine"]
        after_db = count_jobs(database_url)

        result = {
            "jobs_per_s": round(r["accepted"] / r["seconds"], 1),
            "accepted": r["accepted"],
            "errors": r["errors"],
            "seconds": round(r["seconds"], 3),
            "client": client,
            "database": "postgres" if database_url.startswith("postgres") else "sqlite",
            "connections": args.connections,
            "p50_ms": round(r["p50_ms"], 2),
            "p99_ms": round(r["p99_ms"], 2),
            "error_statuses": r["error_statuses"],
            "jobs_in_db": (after_db - before_db) if after_db is not None and before_db is not None else None,
            "api_workers": args.api_workers,
            "api_threads": args.api_threads,
            "client_busy_cores": round(client_cpu / wall, 2),
            "api_busy_cores": round(api_cpu / wall, 2),
            "redis_busy_cores": round(redis_cpu / wall, 2),
            "postgres_busy_cores": round(pg_cpu / wall, 2) if pg_pid else None,
            "machine_busy_cores": round(machine / wall, 2),
            "other_busy_cores": round((machine - client_cpu - api_cpu - redis_cpu - pg_cpu) / wall, 2),
            "cores": os.cpu_count(),
            "load_avg_1m_before": round(load_before, 2),
        }
        if r.get("error_samples"):
            log(f"error samples: {r['error_samples']}")
        if client == "python" and result["client_busy_cores"] >= 0.8:
            log(
                f"WARNING: the python client used {result['client_busy_cores']} cores (its GIL allows ~1): "
                "it is likely the bottleneck; use --client wrk"
            )
        if result["other_busy_cores"] > 0.25:
            log(f"WARNING: other processes kept {result['other_busy_cores']} cores busy; the figure is disturbed")
        print(json.dumps(result), flush=True)
        return 0
    finally:
        stop(api)
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
