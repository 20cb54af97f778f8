"""Time to first token: a chat job's first ``delta`` event through vramq vs vLLM's own ``AsyncLLM`` stream.

Run from the repository root::

    .venv/bin/python bench/ttft.py [--requests 40] [--max-tokens 16] [--database-url postgresql://...]

What is measured, in one run, on the tiny random-weight Qwen2 (``make_tiny_qwen2``):

1. **Direct.** The benchmark process builds ``vllm.v1.engine.async_llm.AsyncLLM`` with the
   worker's own settings (``VllmTextBackend(entry, "cpu").engine_args()``) and streams
   each request (``RequestOutputKind.DELTA``, the same prompt text, seed and sampling as
   the vramq job) one at a time: ``direct_ms`` is from the ``generate`` call to its first
   output that carries a token. The engine is then shut down, before vramq starts.
2. **vramq.** A real ``vramq api`` (gunicorn) and ``vramq worker --cpu`` (Celery, the
   same engine inside the worker), SQLite (or ``--database-url``), a Redis database of the
   benchmark's choosing (``--redis``). One request at a time, as a client would: the
   client's clock just before ``POST /v1/jobs``, then ``GET /v1/jobs/{id}/events``
   (server-sent events) on another keep-alive connection, to the first ``delta`` event
   read: ``vramq_ms``. Nothing else is queued, so this is the queue's own cost in the
   path to the first token: the POST (validation, reservation, insert, publish), the
   broker, the worker's take, the engine, the event stream (Redis) and the HTTP stream.

``added_ms_p50 = vramq_ms_p50 - direct_ms_p50`` (and the same at p99). Progress lines
go to stderr; the last line on stdout is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import requests
from _common import (
    ENGINE_CPU,
    QUEUE_CPU,
    CpuMeter,
    Procs,
    build_model,
    parse_ts,
    pct,
    pin,
    pin_engine_env,
    start_vramq,
    tree_cpu_s,
    vramq_env,
)
from llm_throughput import MODEL_ID, job_inputs, wait_no_vllm, write_catalog


def log(msg: str) -> None:
    print(f"[ttft {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_direct(catalog: Path, inps: list[dict], warmup: list[dict]) -> list[float]:
    """Each input streamed alone through ``AsyncLLM``: ms to the first token."""
    from vramq.gpu_workers.backends import vllm_text
    from vramq.gpu_workers.backends.vllm_text import VllmTextBackend
    from vramq.jobs.catalog import load_catalog

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(vllm_text.CPU_KV_CACHE_GIB))
    for name, value in vllm_text._VLLM_ENV.items():
        os.environ.setdefault(name, value)
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    entry = load_catalog(catalog).get(MODEL_ID)
    engine_args = VllmTextBackend(entry, "cpu").engine_args()

    async def main() -> list[float]:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))
        try:

            async def first_token_ms(inp: dict) -> float:
                params = SamplingParams(
                    max_tokens=inp["max_tokens"],
                    temperature=inp["temperature"],
                    top_p=inp["top_p"],
                    seed=inp["seed"],
                    output_kind=RequestOutputKind.DELTA,
                )
                t0 = time.perf_counter()
                first = None
                async for out in engine.generate(inp["prompt"], params, uuid.uuid4().hex):
                    if first is None and out.outputs and out.outputs[0].token_ids:
                        first = (time.perf_counter() - t0) * 1000
                assert first is not None, "no token streamed"
                return first

            for inp in warmup:
                await first_token_ms(inp)
            return [await first_token_ms(inp) for inp in inps]
        finally:
            engine.shutdown()

    try:
        return asyncio.run(main())
    finally:
        gc.collect()
        left = wait_no_vllm(os.getpid())
        log(f"direct: engine shut down; vLLM processes of ours left: {len(left)}")


def first_delta_ms(http: requests.Session, events: requests.Session, url: str, inp: dict) -> tuple[float, float, str]:
    """POST the job, follow its events to the first ``delta``: ms from before the POST to
    the delta, and to the POST's answer."""
    t0 = time.perf_counter()
    r = http.post(url + "/v1/jobs", json={"model": MODEL_ID, "input": inp}, timeout=60)
    if r.status_code != 202:
        raise RuntimeError(f"submit answered {r.status_code}: {r.text[:300]}")
    post_ms = (time.perf_counter() - t0) * 1000
    job_id = r.json()["id"]
    with events.get(f"{url}/v1/jobs/{job_id}/events", stream=True, timeout=60) as stream:
        event = None
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "delta":
                return (time.perf_counter() - t0) * 1000, post_ms, job_id
            elif line.startswith("data:") and event == "done":
                raise RuntimeError(f"job {job_id} ended without a delta: {line}")
    raise RuntimeError(f"the event stream of {job_id} ended without a delta")


def summary(direct: list[float], vramq: list[float]) -> dict:
    out = {
        "vramq_ms_p50": round(pct(vramq, 50), 2),
        "vramq_ms_p99": round(pct(vramq, 99), 2),
        "direct_ms_p50": round(pct(direct, 50), 2),
        "direct_ms_p99": round(pct(direct, 99), 2),
    }
    out["added_ms_p50"] = round(out["vramq_ms_p50"] - out["direct_ms_p50"], 2)
    out["added_ms_p99"] = round(out["vramq_ms_p99"] - out["direct_ms_p99"], 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=40, help="requests measured on each side, one at a time")
    ap.add_argument("--warmup", type=int, default=4, help="warm-up requests on each side")
    ap.add_argument("--max-tokens", type=int, default=16, help="new tokens per request")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="broker URL (not flushed)")
    ap.add_argument("--database-url", default=None, help="default: SQLite in the work dir")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="the engine (direct, then the worker) on CPU 1, the API and the client on CPU 0",
    )
    args = ap.parse_args()
    if args.pin:
        pin_engine_env()
        pin(os.getpid(), ENGINE_CPU)  # the direct engine's processes inherit it

    work = Path(tempfile.mkdtemp(prefix="vramq-ttft-bench-"))
    procs = None
    try:
        weights = build_model("vramq.gpu_workers.tiny_text", "make_tiny_qwen2", work / "models" / "tiny-qwen2")
        catalog = work / "bench-catalog.toml"
        write_catalog(catalog, weights, 8, args.max_tokens)
        measured = job_inputs(args.requests, args.max_tokens)
        warmup = job_inputs(args.warmup, args.max_tokens, offset=100_000)
        load_before = os.getloadavg()[0]

        direct = run_direct(catalog, measured, warmup)
        if args.pin:
            pin(os.getpid(), QUEUE_CPU)  # the client, from here on
        log(f"direct: first token p50 {pct(direct, 50):.1f} ms over {len(direct)} requests")

        env = vramq_env(work / "data", work / "models", catalog, args.redis, args.database_url)
        logs = work / "logs"
        logs.mkdir()
        procs = Procs(env, logs, log)
        url, api, worker = start_vramq(procs, MODEL_ID, 2, args.pin)
        log(f"vramq ready at {url}")
        meter = CpuMeter({"api": lambda: tree_cpu_s(api.pid), "worker": lambda: tree_cpu_s(worker.pid)})
        http, events = requests.Session(), requests.Session()
        for inp in warmup:
            first_delta_ms(http, events, url, inp)
            time.sleep(0.5)
        a = meter.sample()
        vramq, post, dispatch = [], [], []
        for inp in measured:
            ms, post_ms, job_id = first_delta_ms(http, events, url, inp)
            vramq.append(ms)
            post.append(post_ms)
            while (job := http.get(f"{url}/v1/jobs/{job_id}", timeout=60).json())["status"] == "running":
                time.sleep(0.01)  # one at a time: the next starts once this one is done
            dispatch.append((parse_ts(job["started_at"]) - parse_ts(job["created_at"])) * 1000)
        cpu = CpuMeter.delta(a, meter.sample())
        log(f"vramq: first delta p50 {pct(vramq, 50):.1f} ms over {len(vramq)} requests")
        print(
            json.dumps(
                {
                    **summary(direct, vramq),
                    # Where vramq's part goes: the POST's answer (client clock), and the
                    # job's created_at -> started_at (server clock: broker, worker's take).
                    "post_ms_p50": round(pct(post, 50), 2),
                    "dispatch_ms_p50": round(pct(dispatch, 50), 2),
                    "requests": args.requests,
                    "max_tokens": args.max_tokens,
                    "database": "postgres" if args.database_url else "sqlite",
                    "pinned": args.pin,
                    "direct_ms": [round(x, 1) for x in direct],
                    "vramq_ms": [round(x, 1) for x in vramq],
                    "cpu": cpu,
                    "load_avg_1m_before": round(load_before, 2),
                }
            )
        )
        return 0
    finally:
        if procs is not None:
            left = procs.stop()
            log(f"vramq processes stopped{'; left: ' + str(left) if left else ''}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
