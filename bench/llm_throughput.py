"""Text generation throughput: the same prompts through vramq and through vLLM's offline ``LLM.generate``.

Run from the repository root::

    .venv/bin/python bench/llm_throughput.py [--model tiny-qwen2] [--prompts 256] [--max-tokens 64] [--max-batch 256]

What is measured, in one run, on the tiny random-weight Qwen2 (``make_tiny_qwen2``), or
with ``--model smollm2-135m`` on the real SmolLM2-135M-Instruct of the embedded catalog
(``gpu_workers.small``; see the end of point 2 for what changes with a real model):

1. **Direct baseline.** The benchmark process builds the offline engine with exactly the
   worker's settings: ``vllm.LLM(**VllmTextBackend(entry, "cpu").engine_args())``
   (same weights, dtype float32, ``max_model_len``, ``max_num_seqs = max_batch``,
   ``enforce_eager``, seed, and the same ``VLLM_CPU_KVCACHE_SPACE``). After a warm-up
   call it runs ONE ``LLM.generate`` over all N prompts (token ids from the engine's
   tokenizer, as ``VllmTextBackend.prompt_token_ids`` makes them) with
   ``temperature 1.0, top_p 1.0``, a per-request seed (the one the vramq job gets) and
   ``ignore_eos=True``, so every request generates exactly ``max_tokens`` tokens.
   ``direct_s`` is the wall time of that call; ``direct_tokens`` the generated tokens.
   The engine is then shut down and freed, and the benchmark waits until no vLLM
   process of its own is left, BEFORE vramq starts: on a 2-core machine the two must
   not compete for the cores.

2. **vramq.** Real processes, as in production: ``python -m api.cli api`` (gunicorn)
   and ``python -m api.cli worker --cpu --models bench-qwen2`` (Celery threads pool with
   ``max_batch`` task threads, each feeding one request to the worker's ``AsyncLLM``),
   SQLite in a temporary data dir (or ``--database-url``), a Redis database (``--redis``; not flushed, only the
   benchmark's own queue is cleared) and a catalog written for the benchmark: model
   ``bench-qwen2``, the tiny-qwen2 weights with ``max_batch`` = ``--max-batch``, so the engine
   may hold as many concurrent sequences as the direct one). vramq has no
   ``ignore_eos`` input; the tiny model never samples its end tokens (see
   ``gpu_workers.tiny_text``), so its generations also run to ``max_tokens``, which the
   benchmark checks: ``vramq_tokens`` (sum of the jobs' ``output.usage.completion_tokens``)
   must equal ``direct_tokens`` (``tokens_match``). A real model does sample its
   end-of-turn token, so with ``smollm2-135m`` the direct run does not set
   ``ignore_eos`` either: both runs stop where the model stops, with the same seeds, and
   ``tokens_match`` tells whether they generated the same amount. After a few warm-up jobs, the N jobs
   (same prompts, same seeds, same sampling settings) are POSTed as fast as
   ``--submit-threads`` client threads can, then followed to ``succeeded`` (only the
   oldest unfinished job is polled, every ``--poll-ms``; the end comes from the server's
   ``finished_at``, so polling adds load, not error). ``vramq_s`` runs from the client's
   clock just before the first POST to the latest ``finished_at`` (same host, same
   clock). ``submit_s`` is how long the POSTs took, ``last_started_s`` when the worker
   had taken the last job (both from the same start): they show how much of
   ``vramq_s`` is the engine not yet holding all N requests. ``--prequeue`` (a
   diagnostic) stops the worker's process group (SIGSTOP) while the N jobs are POSTed
   and starts the clock at its SIGCONT: the worker's own throughput on a full queue,
   without the POSTs and the engine competing for the cores.

``vramq_tokens_per_s = vramq_tokens / vramq_s``, ``direct_tokens_per_s =
direct_tokens / direct_s``, ``ratio = vramq_tokens_per_s / direct_tokens_per_s``
(1.0: vramq costs no throughput). The CPU used by each part during each phase, and by
other processes on the machine (``other_busy_cores``: a shared machine disturbs the
figures when it is well above zero), is reported under ``cpu``.

Progress lines go to stderr; the last line on stdout is one JSON object with the figures.
No assertion is made on any of them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests
from _common import (
    ENGINE_CPU,
    QUEUE_CPU,
    CpuMeter,
    Procs,
    _proc_stat,
    build_model,
    descendants,
    parse_ts,
    pin,
    pin_engine_env,
    start_vramq,
    tree_cpu_s,
    vramq_env,
)

from vramq.jobs import proctree

MODEL_ID = "bench-qwen2"
"""The catalog id the benchmark serves the model under: a queue (``model.bench-qwen2``)
no test and no other benchmark consumes, since the Redis database may be shared."""

MODELS = {
    # --model: (builder module, builder, catalog id, whether the model can end on its own)
    "tiny-qwen2": ("vramq.gpu_workers.tiny_text", "make_tiny_qwen2", "bench-qwen2", False),
    "smollm2-135m": ("vramq.gpu_workers.small", "make_smollm2", "bench-smollm2", True),
}


def log(msg: str) -> None:
    print(f"[llm_throughput {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- CPU accounting (the machine is small and may be shared) ------------------------


# --- set-up -------------------------------------------------------------------------


def write_catalog(path: Path, weights: Path, max_batch: int, max_tokens: int, model: str = "tiny-qwen2") -> None:
    path.write_text(
        f"""[[models]]
id = "{MODEL_ID}"
kind = "text"
backend = "vllm"
weights = {json.dumps(str(weights))}
dtype = "float32"
description = "llm_throughput benchmark: {model}"
max_batch = {max_batch}
limits = {{ max_context = 2048, max_tokens = {max(1024, max_tokens)} }}
defaults = {{ max_tokens = {max_tokens}, temperature = 1.0, top_p = 1.0 }}
"""
    )


SUBJECTS = [
    "the sea at night",
    "a hash table",
    "the history of bread",
    "a train journey",
    "photosynthesis",
    "a lighthouse keeper",
    "the rules of chess",
    "a small village",
    "learning a language",
    "the weather",
]


def job_inputs(n: int, max_tokens: int, offset: int = 0) -> list[dict]:
    """N distinct, deterministic text inputs: temperature 1.0, an explicit seed each."""
    return [
        {
            "prompt": f"Write a short text about {SUBJECTS[i % len(SUBJECTS)]}, part {i + offset}.",
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "top_p": 1.0,
            "seed": 1000 + i + offset,
        }
        for i in range(n)
    ]


# --- direct baseline ----------------------------------------------------------------


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def live_descendants(pid: int) -> list[int]:
    """Descendants of ``pid`` that are neither zombies (ours are reaped) nor the
    multiprocessing resource tracker (it idles until this process exits)."""
    out = []
    for p in descendants(pid):
        try:
            state = _proc_stat(p)[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if "resource_tracker" in cmdline(p):
            continue
        if state == "Z":
            try:
                os.waitpid(p, os.WNOHANG)  # ours to reap when it is our child
            except ChildProcessError:
                pass
            continue
        out.append(p)
    return out


def wait_no_vllm(pid: int, timeout: float = 60) -> list[int]:
    """Wait until ``pid`` has no live descendant processes left; return those still there."""
    deadline = time.monotonic() + timeout
    while True:
        left = live_descendants(pid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def run_direct(catalog_path: Path, inputs: list[dict], warmup: list[dict], ignore_eos: bool = True) -> dict:
    """Build the offline engine, warm it up, time one ``generate`` over all inputs, shut it down."""
    from vramq.gpu_workers.backends import vllm_text
    from vramq.gpu_workers.backends.vllm_text import VllmTextBackend
    from vramq.jobs.catalog import load_catalog

    # The settings VllmTextBackend.load() puts in the environment, the same way.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(vllm_text.CPU_KV_CACHE_GIB))
    for name, value in vllm_text._VLLM_ENV.items():
        os.environ.setdefault(name, value)
    import vllm
    from vllm import SamplingParams

    entry = load_catalog(catalog_path).get(MODEL_ID)
    engine_args = VllmTextBackend(entry, "cpu").engine_args()
    log(f"direct: vllm.LLM({engine_args})")
    t0 = time.perf_counter()
    llm = vllm.LLM(**engine_args)
    log(f"direct: engine up in {time.perf_counter() - t0:.1f}s")
    tokenizer = llm.get_tokenizer()

    def prompts(inps: list[dict]) -> list[dict]:
        return [{"prompt_token_ids": tokenizer.encode(inp["prompt"])} for inp in inps]

    def params(inps: list[dict]) -> list:
        return [
            SamplingParams(
                max_tokens=inp["max_tokens"],
                temperature=inp["temperature"],
                top_p=inp["top_p"],
                seed=inp["seed"],
                ignore_eos=ignore_eos,
            )
            for inp in inps
        ]

    try:
        llm.generate(prompts(warmup), params(warmup), use_tqdm=False)
        ps, sp = prompts(inputs), params(inputs)
        # The engine's processes are children of this one (measured while they live).
        meter = CpuMeter({"bench": lambda: tree_cpu_s(os.getpid())})
        a = meter.sample()
        t0 = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        direct_s = time.perf_counter() - t0
        cpu = CpuMeter.delta(a, meter.sample())
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        finish = sorted({str(o.outputs[0].finish_reason) for o in outs})
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in ps)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    left = wait_no_vllm(os.getpid())
    if left:
        log(f"direct: processes still alive after shutdown, killing them: {[(p, cmdline(p)[:80]) for p in left]}")
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        left = wait_no_vllm(os.getpid(), 10)
    log(f"direct: engine shut down; vLLM processes of ours left: {len(left)}")
    return {
        "direct_s": direct_s,
        "tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "finish_reasons": finish,
        "leftover_processes": len(left),
        "cpu": cpu,
    }


# --- the vramq processes ------------------------------------------------------------


class Api:
    def __init__(self, url: str):
        self.url = url
        self._local = threading.local()
        self.ids: list[str] = []
        """Every job submitted (their event streams are deleted at the end)."""

    @property
    def http(self) -> requests.Session:
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = requests.Session()
        return s

    def submit(self, inp: dict) -> dict:
        r = self.http.post(self.url + "/v1/jobs", json={"model": MODEL_ID, "input": inp}, timeout=60)
        if r.status_code != 202:
            raise RuntimeError(f"submit answered {r.status_code}: {r.text[:500]}")
        return r.json()

    def get(self, job_id: str) -> dict:
        r = self.http.get(f"{self.url}/v1/jobs/{job_id}", timeout=60)
        r.raise_for_status()
        return r.json()

    def wait(self, job_id: str, poll_s: float, timeout: float = 600) -> dict:
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


def run_vramq(
    api: Api, inputs: list[dict], threads: int, poll_s: float, paused: subprocess.Popen | None = None
) -> dict:
    """Submit every input, then follow the jobs to the end.

    ``paused``: the worker, its whole process group stopped (SIGSTOP) while the jobs are
    submitted and continued (SIGCONT) once all are queued; the clock then starts at the
    SIGCONT (a diagnostic: the worker's throughput on a full queue, without the POSTs
    competing with the engine for the cores).
    """
    submitted: list[tuple[float, str] | None] = [None] * len(inputs)

    def one(i: int) -> None:
        t = time.time()
        submitted[i] = (t, api.submit(inputs[i])["id"])
        api.ids.append(submitted[i][1])

    if paused is not None:
        proctree.signal_group(paused, signal.SIGSTOP)
    try:
        t_first = time.time()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(len(inputs))))
        t_submitted = time.time()
    finally:
        if paused is not None:
            proctree.signal_group(paused, signal.SIGCONT)
    submit_s = t_submitted - t_first
    if paused is not None:
        t_first = time.time()
    order = sorted(range(len(inputs)), key=lambda i: submitted[i][0])
    jobs = [api.wait(submitted[i][1], poll_s) for i in order]
    return {"t_first": t_first, "submit_s": submit_s, "jobs": jobs}


def forget_events(broker, job_ids: list[str]) -> None:
    """Delete the benchmark's job event streams (they would otherwise stay a day in a
    Redis database the benchmark does not flush)."""
    from vramq.jobs.events import key

    try:
        for k in range(0, len(job_ids), 500):
            broker.delete(*(key(j) for j in job_ids[k : k + 500]))
    except Exception as exc:
        log(f"could not delete the jobs' event streams: {exc}")


# --- main ---------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny-qwen2", help="the model served")
    ap.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="build (or find built) the model here, e.g. a VRAMQ_MODELS_DIR (default: the work dir)",
    )
    ap.add_argument("--prompts", type=int, default=256, help="prompts (jobs) in the measured run")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument(
        "--max-batch",
        type=int,
        default=256,
        help="the catalog's max_batch: vLLM max_num_seqs of both engines, and the worker's task threads",
    )
    ap.add_argument("--warmup", type=int, default=8, help="warm-up prompts before each measured run")
    ap.add_argument("--submit-threads", type=int, default=8, help="client threads POSTing the jobs")
    ap.add_argument("--poll-ms", type=float, default=200, help="poll interval while waiting for the jobs")
    ap.add_argument("--api-workers", type=int, default=2, help="gunicorn processes")
    ap.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379/0",
        help="broker URL (not flushed; the tests take databases 1-13, overhead.py 14, submit_rate.py 15)",
    )
    ap.add_argument(
        "--database-url",
        default=None,
        help="default: SQLite in the work dir; e.g. postgresql://postgres@127.0.0.1:5432/bench (an empty database)",
    )
    ap.add_argument(
        "--workdir", type=Path, default=None, help="keep the model, data and logs here (default: a temp dir, removed)"
    )
    ap.add_argument(
        "--prequeue",
        action="store_true",
        help="diagnostic: stop the worker (SIGSTOP) while the jobs are submitted, time from its SIGCONT",
    )
    ap.add_argument("--skip-direct", action="store_true", help="vramq only (no ratio)")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="the engine (direct, then the worker's) on CPU 1; the API, the worker's own process and the client on CPU 0",
    )
    args = ap.parse_args()
    if args.max_batch > 256:
        ap.error("--max-batch is at most 256 (the catalog's bound)")

    global MODEL_ID
    module, builder, MODEL_ID, ends_itself = MODELS[args.model]
    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="vramq-llm-bench-")) if own_tmp else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    procs = api = broker = None
    try:
        t0 = time.perf_counter()
        models_dir = args.models_dir.resolve() if args.models_dir else work / "models"
        weights = build_model(module, builder, models_dir / args.model)
        log(f"{args.model} ready in {time.perf_counter() - t0:.1f}s at {weights}")
        catalog = work / "bench-catalog.toml"
        write_catalog(catalog, weights, args.max_batch, args.max_tokens, args.model)
        inputs = job_inputs(args.prompts, args.max_tokens)
        warmup = job_inputs(args.warmup, args.max_tokens, offset=100_000)

        cpu: dict[str, dict] = {}
        load_before = os.getloadavg()[0]
        direct = None
        if args.pin:
            pin_engine_env()
            pin(os.getpid(), ENGINE_CPU)  # the direct engine's processes inherit it
        if not args.skip_direct:
            direct = run_direct(catalog, inputs, warmup, ignore_eos=not ends_itself)
            cpu["direct"] = direct["cpu"]
            log(
                f"direct: {args.prompts} prompts, {direct['tokens']} tokens in {direct['direct_s']:.3f}s "
                f"({direct['tokens'] / direct['direct_s']:.1f} tok/s), finish reasons {direct['finish_reasons']}"
            )

        if args.pin:
            pin(os.getpid(), QUEUE_CPU)  # the client, from here on

        import redis

        broker = redis.Redis.from_url(args.redis)
        # Not flushed: the database may be shared. Only our model's queues (left over
        # from an interrupted run) are cleared.
        for key in broker.scan_iter(f"model.{MODEL_ID}*"):
            broker.delete(key)
        redis_pid = broker.info("server").get("process_id")
        data = work / "data"
        if data.exists():
            shutil.rmtree(data)
        env = vramq_env(data, work / "models", catalog, args.redis, args.database_url)
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        procs = Procs(env, logs, log)
        t0 = time.perf_counter()
        url, api_proc, worker = start_vramq(procs, MODEL_ID, args.api_workers, args.pin)
        log(f"vramq ready in {time.perf_counter() - t0:.1f}s at {url} (logs in {logs})")
        api = Api(url)
        parts = {
            "bench": time.process_time,
            "api": lambda: tree_cpu_s(api_proc.pid),
            "worker": lambda: tree_cpu_s(worker.pid),
        }
        if redis_pid:
            parts["redis"] = lambda: tree_cpu_s(redis_pid)
        meter = CpuMeter(parts)

        with ThreadPoolExecutor(max(1, len(warmup))) as pool:
            ids = list(pool.map(lambda inp: api.submit(inp)["id"], warmup))
        api.ids += ids
        for jid in ids:
            api.wait(jid, 0.05)
        log("vramq: warmed up")

        a = meter.sample()
        run = run_vramq(api, inputs, args.submit_threads, args.poll_ms / 1000, paused=worker if args.prequeue else None)
        cpu["vramq"] = CpuMeter.delta(a, meter.sample())
        jobs = run["jobs"]
        t_first = run["t_first"]
        vramq_s = max(parse_ts(j["finished_at"]) for j in jobs) - t_first
        last_started_s = max(parse_ts(j["started_at"]) for j in jobs) - t_first
        vramq_tokens = sum(j["output"]["usage"]["completion_tokens"] for j in jobs)
        finish = sorted({str(j["output"]["finish_reason"]) for j in jobs})
        log(
            f"vramq: {args.prompts} jobs submitted in {run['submit_s']:.3f}s, last started at {last_started_s:.3f}s, "
            f"all done in {vramq_s:.3f}s, {vramq_tokens} tokens ({vramq_tokens / vramq_s:.1f} tok/s), "
            f"finish reasons {finish}"
        )

        leftover = procs.stop()
        procs = None
        log(f"vramq processes stopped; processes of their sessions left: {len(leftover)}")

        expected = args.prompts * args.max_tokens
        direct_tps = direct["tokens"] / direct["direct_s"] if direct else None
        vramq_tps = vramq_tokens / vramq_s
        log(
            f"completion tokens: vramq {vramq_tokens}, direct {direct['tokens'] if direct else None}, "
            f"{'at most' if ends_itself else 'expected'} {expected}"
        )
        result = {
            "model": args.model,
            "vramq_tokens_per_s": round(vramq_tps, 2),
            "direct_tokens_per_s": round(direct_tps, 2) if direct else None,
            "ratio": round(vramq_tps / direct_tps, 4) if direct else None,
            "prompts": args.prompts,
            "max_tokens": args.max_tokens,
            "max_batch": args.max_batch,
            "prequeue": args.prequeue,
            "pinned": args.pin,
            "database": "postgres" if args.database_url and args.database_url.startswith("postgres") else "sqlite",
            "vramq_s": round(vramq_s, 4),
            "direct_s": round(direct["direct_s"], 4) if direct else None,
            "vramq_tokens": vramq_tokens,
            "direct_tokens": direct["tokens"] if direct else None,
            "tokens_match": (vramq_tokens == direct["tokens"]) if direct else None,
            "prompt_tokens": direct["prompt_tokens"] if direct else None,
            "submit_s": round(run["submit_s"], 4),
            "last_started_s": round(last_started_s, 4),
            "leftover_processes": (direct["leftover_processes"] if direct else 0) + len(leftover),
            "load_avg_1m_before": round(load_before, 2),
            "cpu": cpu,
        }
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
            left = procs.stop()
            log(f"vramq processes stopped (processes of their sessions left: {len(left)})")
        if broker is not None and api is not None and api.ids:
            forget_events(broker, api.ids)
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
