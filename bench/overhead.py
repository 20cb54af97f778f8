"""What vramq costs on top of the model: the same image jobs through vramq and through the bare pipeline.

Run from the repository root::

    .venv/bin/python bench/overhead.py [--jobs 64] [--size 256] [--steps 4]
                                       [--database-url postgresql://...]

What is measured, in one run:

1. **Direct baseline.** The benchmark process loads the tiny FLUX-type pipeline through
   the worker's own backend class (``DiffusersImageBackend(entry, "cpu").load()``),
   warms it up with one full batch, then renders the N jobs in batches of
   ``max_batch`` (same prompts and seeds as the vramq run) by calling
   ``backend.pipe(**backend.pipeline_kwargs(items))`` under ``torch.inference_mode()``,
   exactly as the worker's ``run_batch`` does minus the step callback and the PNG
   encoding. ``direct_s`` is the wall time of those calls. The pipeline is then freed
   so it does not compete with vramq for the (few) cores.

2. **vramq, bulk phase (throughput).** Real processes, as in production:
   ``python -m api.cli api --workers 2`` (gunicorn) and ``python -m api.cli worker --cpu``
   (Celery, threads pool, the dynamic batcher), with a Redis database flushed first,
   SQLite in a temporary data dir (or ``--database-url``), and a catalog written for the
   benchmark (model ``bench-flux``, the tiny-flux weights, float32, ``max_batch`` 4).
   After a warm-up batch the N jobs are submitted as fast as a few client threads can
   (``--submit-threads``), then followed to ``succeeded`` (only the oldest unfinished
   job is polled, every ``--bulk-poll-ms``; the figures come from server timestamps, so
   polling only adds load, not error). ``system_s`` runs from the
   client's clock just before the first POST to the latest server ``finished_at``
   (same host, same clock). ``ratio = direct_s / system_s`` (1.0: vramq adds nothing to
   throughput). ``mean_batch_size`` is the mean of the jobs' ``usage.batch_size``.
   The ratio splits in two factors: ``pipeline_busy_frac = bulk_model_s / system_s``
   (how much of the time the worker had a batch running; ``bulk_model_s`` sums the
   batcher's ``run_batch`` wall times, from ``usage``) and ``model_slowdown =
   bulk_model_s / direct_s`` (how much longer the same batches took inside the worker:
   CPU or GIL contention from everything else running beside the model, the PNG
   encoding of the jobs' threads included; ``direct_png_s`` prices that encoding). ``ratio =
   pipeline_busy_frac / model_slowdown``.

3. **vramq, sequential phase (latency overhead).** ``--seq-jobs`` jobs, one at a time:
   each is submitted only once the previous one has succeeded, so no job ever queues
   behind another. For each job::

       latency_ms   = finished_at - created_at            (server timestamps, ISO, µs)
       model_ms     = usage.gpu_seconds * usage.batch_size (wall time of the batcher's
                      run_batch call the job was part of: pipeline + PNG encoding)
       overhead_ms  = latency_ms - model_ms

   i.e. everything between the API having validated the job and the worker having
   committed ``succeeded``, except the model call itself: the INSERT + publish, broker
   delivery, the worker claiming the row (lease), the batcher's gathering wait
   (``max_wait_ms``, since a lone job never fills a batch), storing the PNG and the
   final UPDATE. It does not include the HTTP round trips of the client (the POST's
   response, the polling). ``overhead_ms_p50`` / ``overhead_ms_p99`` are over this
   phase; ``dispatch_ms_p50`` (created_at -> started_at, i.e. until the worker took the
   job) and ``finish_ms_p50`` (started_at -> finished_at minus model_ms: batcher wait,
   store, commit) split it. The bulk phase's overhead is not reported as "overhead"
   because there it is dominated by queueing behind other batches.

Progress lines go to stderr; the last line on stdout is one JSON object with the figures.
No assertion is made on any of them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests
from _common import Procs, free_port, pct, vramq_env

MODEL_ID = "bench-flux"


def log(msg: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_ts(value: str) -> float:
    """An API timestamp (ISO 8601, ``Z``) as POSIX seconds."""
    return datetime.fromisoformat(value).timestamp()


# --- CPU accounting (the machine is small and may be shared) ------------------------

_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (not idle, not iowait)."""
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


class CpuMeter:
    """Where the CPU went during a phase: ours by part, and everything else on the machine.

    ``other_busy_cores`` is CPU used by processes outside this benchmark (other users of
    a shared machine): when it is well above zero the figures of that phase are
    disturbed. A local PostgreSQL is counted as ours, all of it.
    """

    def __init__(self, parts: dict):
        self.parts = parts  # name -> callable returning CPU seconds so far

    def sample(self) -> dict[str, float]:
        s = {name: f() for name, f in self.parts.items()}
        s["machine"] = machine_busy_s()
        s["wall"] = time.monotonic()
        return s

    @staticmethod
    def delta(a: dict, b: dict) -> dict:
        wall = b["wall"] - a["wall"]
        names = [k for k in a if k not in ("wall", "machine")]
        out = {f"{k}_cpu_s": round(b[k] - a[k], 2) for k in names}
        own = sum(b[k] - a[k] for k in names)
        out["machine_busy_cores"] = round((b["machine"] - a["machine"]) / wall, 2)
        out["other_busy_cores"] = round((b["machine"] - a["machine"] - own) / wall, 2)
        return out


# --- set-up -------------------------------------------------------------------------


def write_catalog(path: Path, weights: Path, size: int, steps: int, max_batch: int, max_wait_ms: int) -> None:
    side = max(1024, size)
    path.write_text(
        f"""[[models]]
id = "{MODEL_ID}"
kind = "image"
backend = "diffusers"
weights = {json.dumps(str(weights))}
dtype = "float32"
description = "overhead benchmark: tiny FLUX-type pipeline"
max_batch = {max_batch}
max_wait_ms = {max_wait_ms}
limits = {{ max_width = {side}, max_height = {side}, min_side = 32, size_multiple = 16, max_steps = {max(50, steps)}, max_num_images = 4 }}
defaults = {{ width = {size}, height = {size}, steps = {steps}, guidance = 0.0, num_images = 1 }}
"""
    )


def job_inputs(n: int, size: int, steps: int, offset: int = 0) -> list[dict]:
    """N distinct, deterministic image inputs (one image each)."""
    subjects = [
        "a red fox",
        "a lighthouse in a storm",
        "a bowl of fruit",
        "a city at night",
        "a cat on a table",
        "a mountain lake",
        "a robot painter",
        "a snowy forest",
    ]
    return [
        {
            "prompt": f"{subjects[i % len(subjects)]}, study {i + offset}",
            "width": size,
            "height": size,
            "steps": steps,
            "guidance": 0.0,
            "seed": 1000 + i + offset,
            "num_images": 1,
        }
        for i in range(n)
    ]


# --- direct baseline ----------------------------------------------------------------


def run_direct(catalog_path: Path, inputs: list[dict], warmup: list[dict]) -> dict:
    import torch

    from vramq.gpu_workers.backends.base import WorkItem
    from vramq.gpu_workers.backends.diffusers_image import DiffusersImageBackend, _item_result
    from vramq.jobs.catalog import load_catalog

    entry = load_catalog(catalog_path).get(MODEL_ID)
    backend = DiffusersImageBackend(entry, "cpu")
    backend.load()
    log(f"direct: pipeline loaded in {backend.load_seconds:.2f}s (torch threads {torch.get_num_threads()})")

    def items(inps: list[dict]) -> list:
        return [
            WorkItem(
                job_id=f"direct-{i}",
                input=entry.validate_input(inp),
                on_progress=lambda f: None,
                is_canceled=lambda: False,
            )
            for i, inp in enumerate(inps)
        ]

    def call(batch: list) -> tuple[float, list]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            images = backend.pipe(**backend.pipeline_kwargs(batch)).images
        return time.perf_counter() - t0, images

    for b in range(0, len(warmup), entry.max_batch):
        call(items(warmup[b : b + entry.max_batch]))
    work = items(inputs)
    batches = [work[b : b + entry.max_batch] for b in range(0, len(work), entry.max_batch)]
    per_batch, outputs = [], []
    t0 = time.perf_counter()
    for batch in batches:
        elapsed, images = call(batch)
        per_batch.append(elapsed)
        outputs.append(images)
    direct_s = time.perf_counter() - t0
    # Not part of direct_s: what the worker adds after the pipeline call, encoding each
    # image as PNG the way it does (on the job's thread as it is stored, since the
    # encoding moved off the batcher: no longer part of bulk_model_s).
    t0 = time.perf_counter()
    for images in outputs:
        for k, image in enumerate(images):
            for artifact in _item_result([image], k).artifacts:
                _ = artifact.data
    png_s = time.perf_counter() - t0
    outputs.clear()
    backend.unload()  # drops the pipeline; the benchmark keeps no reference to it
    gc.collect()
    return {"direct_s": direct_s, "per_batch_s": per_batch, "png_s": png_s}


# --- the vramq processes ------------------------------------------------------------


def wait_ready(url: str, procs: Procs, worker_pid: int | None, timeout: float = 180) -> None:
    """Until /readyz answers 200 and (unless ``worker_pid`` is None) that worker is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                if worker_pid is None:
                    return
                workers = requests.get(url + "/v1/workers", timeout=2).json()["data"]
                if any(w.get("pid") == worker_pid and w.get("state") == "ready" for w in workers):
                    return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"vramq not ready within {timeout:.0f}s")


class Api:
    def __init__(self, url: str):
        self.url = url
        self._local = threading.local()

    @property
    def http(self) -> requests.Session:
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = requests.Session()
        return s

    def submit(self, inp: dict) -> dict:
        r = self.http.post(self.url + "/v1/jobs", json={"model": MODEL_ID, "input": inp}, timeout=30)
        if r.status_code != 202:
            raise RuntimeError(f"submit answered {r.status_code}: {r.text[:500]}")
        return r.json()

    def get(self, job_id: str) -> dict:
        r = self.http.get(f"{self.url}/v1/jobs/{job_id}", timeout=30)
        r.raise_for_status()
        return r.json()

    def wait(self, job_id: str, poll_s: float, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["status"] in ("succeeded", "failed", "canceled"):
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll_s)


def run_bulk(api: Api, inputs: list[dict], threads: int, poll_s: float) -> dict:
    submitted: list[tuple[float, str] | None] = [None] * len(inputs)

    def one(i: int) -> None:
        t = time.time()
        submitted[i] = (t, api.submit(inputs[i])["id"])

    t_first = time.time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(len(inputs))))
    t_submitted = time.time()
    # Follow the jobs in submission order: only the oldest unfinished one is polled, so
    # polling adds a handful of requests, not N per sweep, to the load on the 2 cores.
    order = sorted(range(len(inputs)), key=lambda i: submitted[i][0])
    jobs = [api.wait(submitted[i][1], poll_s) for i in order]
    return {"t_first": t_first, "submit_s": t_submitted - t_first, "jobs": jobs}


def timeline(job: dict) -> dict:
    created, started, finished = (parse_ts(job[k]) for k in ("created_at", "started_at", "finished_at"))
    usage = job["usage"]
    model = usage["gpu_seconds"] * usage["batch_size"]
    return {
        "latency": finished - created,
        "model": model,
        "overhead": finished - created - model,
        "dispatch": started - created,
        "finish": finished - started - model,
        "batch_size": usage["batch_size"],
        "created": created,
        "finished": finished,
        "id": job["id"],
    }


# --- main ---------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--jobs", type=int, default=64, help="jobs in the bulk (throughput) phase")
    ap.add_argument("--seq-jobs", type=int, default=16, help="jobs in the sequential (latency) phase")
    ap.add_argument("--size", type=int, default=256, help="image width and height (multiple of 16)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-wait-ms", type=int, default=10, help="the catalog's batcher max_wait_ms")
    ap.add_argument("--submit-threads", type=int, default=8, help="client threads submitting the bulk phase")
    ap.add_argument("--poll-ms", type=float, default=20, help="sequential phase: client poll interval")
    ap.add_argument(
        "--bulk-poll-ms",
        type=float,
        default=200,
        help="bulk phase: poll interval (polls cost API CPU that the model would use on a small machine)",
    )
    ap.add_argument("--api-workers", type=int, default=2, help="gunicorn processes")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="broker URL; this Redis database is FLUSHED")
    ap.add_argument(
        "--database-url",
        default=None,
        help="default: SQLite in the work dir; e.g. postgresql://postgres@127.0.0.1:5432/bench (an empty database)",
    )
    ap.add_argument(
        "--workdir", type=Path, default=None, help="keep models, data and logs here (default: a temp dir, removed)"
    )
    ap.add_argument("--skip-direct", action="store_true", help="vramq phases only (no ratio)")
    ap.add_argument("--dump", type=Path, default=None, help="write every job's timeline (ms) to this JSON file")
    args = ap.parse_args()
    if args.size % 16:
        ap.error("--size must be a multiple of 16")

    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="vramq-bench-")) if own_tmp else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    poll_s = args.poll_ms / 1000
    procs = None
    try:
        from vramq.gpu_workers.tiny import make_tiny

        t0 = time.perf_counter()
        weights = make_tiny(work / "models")["tiny-flux"]
        log(f"tiny models ready in {time.perf_counter() - t0:.1f}s under {work / 'models'}")
        catalog = work / "bench-catalog.toml"
        write_catalog(catalog, weights, args.size, args.steps, args.max_batch, args.max_wait_ms)

        inputs = job_inputs(args.jobs, args.size, args.steps)
        warmup = job_inputs(args.max_batch, args.size, args.steps, offset=100_000)
        seq_inputs = job_inputs(args.seq_jobs, args.size, args.steps, offset=200_000)

        cpu: dict[str, dict] = {}
        load_before = os.getloadavg()[0]
        direct = None
        if not args.skip_direct:
            meter = CpuMeter({"bench": time.process_time})
            a = meter.sample()
            direct = run_direct(catalog, inputs, warmup)
            cpu["direct"] = CpuMeter.delta(a, meter.sample())
            pb = direct["per_batch_s"]
            log(
                f"direct: {args.jobs} jobs in {direct['direct_s']:.3f}s, {len(pb)} batches, "
                f"median batch {statistics.median(pb) * 1000:.1f}ms"
            )

        import redis

        broker = redis.Redis.from_url(args.redis)
        broker.flushdb()
        redis_pid = broker.info("server").get("process_id")
        data = work / "data"
        if data.exists():
            shutil.rmtree(data)
        env = vramq_env(data, work / "models", catalog, args.redis, args.database_url)
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        procs = Procs(env, logs, log)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        procs.spawn("api", ["api", "--port", str(port), "--workers", str(args.api_workers)])
        # The worker starts once the API has migrated the database: two processes
        # migrating a fresh SQLite file at once can fail with "database is locked".
        wait_ready(url, procs, None)
        worker = procs.spawn("worker", ["worker", "--cpu"])
        wait_ready(url, procs, worker.pid)
        log(f"vramq ready in {time.perf_counter() - t0:.1f}s at {url} (logs in {logs})")
        api = Api(url)
        api_proc = procs.children[0][1]
        parts = {
            "bench": time.process_time,
            "api": lambda: tree_cpu_s(api_proc.pid),
            "worker": lambda: tree_cpu_s(worker.pid),
        }
        if redis_pid:
            parts["redis"] = lambda: tree_cpu_s(redis_pid)
        pg_pid = (
            postgres_pid(args.database_url) if args.database_url and args.database_url.startswith("postgres") else None
        )
        if pg_pid:
            parts["postgres"] = lambda: tree_cpu_s(pg_pid)  # all of the local PostgreSQL
        meter = CpuMeter(parts)

        # Warm-up: one batch's worth, submitted together.
        with ThreadPoolExecutor(len(warmup)) as pool:
            ids = list(pool.map(lambda inp: api.submit(inp)["id"], warmup))
        for jid in ids:
            api.wait(jid, poll_s)
        log("vramq: warmed up")

        a = meter.sample()
        bulk = run_bulk(api, inputs, args.submit_threads, args.bulk_poll_ms / 1000)
        cpu["bulk"] = CpuMeter.delta(a, meter.sample())
        tl = [timeline(j) for j in bulk["jobs"]]
        system_s = max(t["finished"] for t in tl) - bulk["t_first"]
        mean_batch = statistics.fmean(t["batch_size"] for t in tl)
        bulk_model_s = sum(t["model"] / t["batch_size"] for t in tl)  # each batch's run_batch once
        log(
            f"bulk: {args.jobs} jobs submitted in {bulk['submit_s']:.3f}s, all done in {system_s:.3f}s, "
            f"mean batch {mean_batch:.2f}"
        )

        seq = []
        a = meter.sample()
        for inp in seq_inputs:
            seq.append(timeline(api.wait(api.submit(inp)["id"], poll_s)))
        cpu["seq"] = CpuMeter.delta(a, meter.sample())
        ov = [t["overhead"] * 1000 for t in seq]
        log(
            f"sequential: {len(seq)} jobs, overhead p50 {pct(ov, 50):.1f}ms p99 {pct(ov, 99):.1f}ms, "
            f"model p50 {pct([t['model'] * 1000 for t in seq], 50):.1f}ms"
        )

        result = {
            "jobs": args.jobs,
            "size": f"{args.size}x{args.size}",
            "steps": args.steps,
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "database": "postgres" if args.database_url and args.database_url.startswith("postgres") else "sqlite",
            "direct_s": round(direct["direct_s"], 4) if direct else None,
            "system_s": round(system_s, 4),
            "ratio": round(direct["direct_s"] / system_s, 4) if direct else None,
            "jobs_per_s_direct": round(args.jobs / direct["direct_s"], 2) if direct else None,
            "jobs_per_s_system": round(args.jobs / system_s, 2),
            "mean_batch_size": round(mean_batch, 3),
            "direct_batch_ms_p50": round(pct(direct["per_batch_s"], 50) * 1000, 2) if direct else None,
            "bulk_model_s": round(bulk_model_s, 4),
            "direct_png_s": round(direct["png_s"], 4) if direct else None,
            "pipeline_busy_frac": round(bulk_model_s / system_s, 4),
            "model_slowdown": round(bulk_model_s / direct["direct_s"], 4) if direct else None,
            "bulk_submit_s": round(bulk["submit_s"], 4),
            "seq_jobs": len(seq),
            "overhead_ms_p50": round(pct(ov, 50), 2),
            "overhead_ms_p99": round(pct(ov, 99), 2),
            "dispatch_ms_p50": round(pct([t["dispatch"] * 1000 for t in seq], 50), 2),
            "finish_ms_p50": round(pct([t["finish"] * 1000 for t in seq], 50), 2),
            "seq_model_ms_p50": round(pct([t["model"] * 1000 for t in seq], 50), 2),
            "seq_latency_ms_p50": round(pct([t["latency"] * 1000 for t in seq], 50), 2),
            "load_avg_1m_before": round(load_before, 2),
            "cpu": cpu,
        }
        if args.dump:

            def ms(rows: list[dict]) -> list[dict]:
                keep = ("batch_size", "created", "finished", "id")
                return [{k: (v if k in keep else round(v * 1000, 3)) for k, v in t.items()} for t in rows]

            args.dump.write_text(json.dumps({"bulk": ms(tl), "seq": ms(seq)}, indent=1))
        for phase, c in cpu.items():
            if c["other_busy_cores"] > 0.25:
                log(
                    f"WARNING: other processes kept {c['other_busy_cores']} cores busy during the {phase} phase; "
                    "its figures are disturbed"
                )
        print(json.dumps(result), flush=True)
        return 0
    finally:
        if procs is not None:
            procs.stop()
            log("vramq processes stopped")
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
