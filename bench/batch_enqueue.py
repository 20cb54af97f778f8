"""Seconds to accept a 10,000-job batch: ``POST /v1/batches`` until its 202.

Run from the repository root::

    .venv/bin/python bench/batch_enqueue.py [--jobs 10000] [--repeat 3] [--source list|file]
                                            [--database-url postgresql://...]

What is measured: a real ``python -m api.cli api`` (gunicorn, 2 processes x 8 threads) on
a temporary data dir (SQLite, or ``--database-url``: an empty PostgreSQL database), a
Redis database flushed first (``--redis``, default db 15), and a catalog with one image
model. No worker runs (a "loading" one is announced so the model is admitted), so the
figure is the whole cost of accepting the batch: parsing and checking every line,
pricing it, one transaction with the batch row, every job row and every job's token
reservation (the caller is a metered account), one message per job published to Redis,
the commit and the answer. ``--source file`` first uploads the lines as a JSONL file
(``POST /v1/files``, not timed) and submits ``{"input_file": …}``.

Each repetition submits a new batch (different ``custom_id`` prefix). ``seconds`` is the
median over the repetitions, ``jobs_per_s`` is ``jobs / seconds``; ``jobs_in_db`` and
``messages`` check the last batch: every job row committed, one message per job.
Progress lines go to stderr; the last stdout line is one JSON object. No assertions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests
from _common import announce_loading_worker
from submit_rate import MODEL_ID, count_jobs, start_api, stop, write_catalog

TARGET_S = 5.0


def log(msg: str) -> None:
    print(f"[batch_enqueue {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def batch_lines(n: int, prefix: str) -> list[dict]:
    return [
        {
            "custom_id": f"{prefix}-{i:05d}",
            "model": MODEL_ID,
            "input": {
                "prompt": f"frame {i} of a red fox in the snow",
                "width": 64,
                "height": 64,
                "steps": 1,
                "seed": i,
            },
        }
        for i in range(n)
    ]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--source", choices=["list", "file"], default="list")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="broker URL; this Redis database is FLUSHED")
    ap.add_argument("--database-url", default=None, help="default: SQLite in the work dir")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vramq-batch-"))
    api = None
    try:
        import redis

        from vramq.jobs.queue import PRIORITY, queue_name

        broker = redis.Redis.from_url(args.redis)
        broker.flushdb()
        data = work / "data"
        catalog = work / "bench-catalog.toml"
        write_catalog(catalog)
        database_url = args.database_url or f"sqlite:///{data / 'vramq.db'}"
        env = {
            "VRAMQ_DATA_DIR": str(data),
            "VRAMQ_CATALOG": str(catalog),
            "VRAMQ_BROKER_URL": args.redis,
            "VRAMQ_DATABASE_URL": database_url,
            "VRAMQ_SECRET_KEY": "bench-" + uuid.uuid4().hex,
            "VRAMQ_FREE_DAILY_TOKENS": "1000000000",
            "VRAMQ_RATE_LIMIT_ANONYMOUS": "0",
            "VRAMQ_RATE_LIMIT_KEYED": "0",
        }
        api, url = start_api(env, work, 2, 8)
        announce_loading_worker(broker, [MODEL_ID])
        http = requests.Session()
        key = http.post(url + "/v1/accounts", json={"name": "bench"}, timeout=30).json()["api_key"]
        http.headers["Authorization"] = f"Bearer {key}"
        warm = http.post(url + "/v1/batches", json={"jobs": batch_lines(10, "warm")}, timeout=60)
        if warm.status_code != 202:
            raise RuntimeError(f"warm-up batch: {warm.status_code} {warm.text[:500]}")

        times, last = [], None
        for rep in range(args.repeat):
            lines = batch_lines(args.jobs, f"r{rep}")
            if args.source == "file":
                jsonl = "\n".join(json.dumps(x) for x in lines).encode()
                up = http.post(
                    url + "/v1/files",
                    data={"purpose": "batch"},
                    files={"file": ("batch.jsonl", jsonl, "application/jsonl")},
                    timeout=120,
                )
                body = {"input_file": up.json()["id"]}
            else:
                body = {"jobs": lines}
            payload = json.dumps(body).encode()
            before = broker.llen(queue_name(MODEL_ID) + f"\x06\x16{PRIORITY['low']}")
            t0 = time.perf_counter()
            resp = http.post(
                url + "/v1/batches", data=payload, headers={"Content-Type": "application/json"}, timeout=300
            )
            elapsed = time.perf_counter() - t0
            if resp.status_code != 202:
                raise RuntimeError(f"batch {rep}: {resp.status_code} {resp.text[:1000]}")
            last = resp.json()
            messages = broker.llen(queue_name(MODEL_ID) + f"\x06\x16{PRIORITY['low']}") - before
            times.append(elapsed)
            log(
                f"batch {rep}: {args.jobs} jobs accepted in {elapsed:.3f} s ({messages} messages, "
                f"{len(payload) / 1e6:.1f} MB body)"
            )

        seconds = statistics.median(times)
        jobs_in_db = count_jobs(database_url)
        result = {
            "seconds": round(seconds, 3),
            "jobs_per_s": round(args.jobs / seconds, 1),
            "jobs": args.jobs,
            "runs_s": [round(t, 3) for t in times],
            "source": args.source,
            "database": "postgres" if database_url.startswith("postgres") else "sqlite",
            "counts_total": last["counts"]["total"],
            "jobs_in_db": jobs_in_db,
            "messages": messages,
            "target_s": TARGET_S,
            "meets_target": seconds <= TARGET_S,
        }
        print(json.dumps(result), flush=True)
        return 0
    finally:
        stop(api)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
