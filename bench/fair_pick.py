"""What one fair turn costs: ``jobs.fairness.pick`` against a long queue.

Run from the repository root::

    .venv/bin/python bench/fair_pick.py [--queued 10000,100000] [--accounts 3]
                                        [--database-url postgresql://...]

For each queue length N, N queued jobs of one model and priority are written straight
into a fresh database (SQLite in a temp dir, or ``--database-url``: an empty PostgreSQL
database, whose ``jobs`` table is analyzed first), spread over ``--accounts`` accounts,
all with one ``created_at`` (as a batch's jobs have). Then ``pick`` (which account's turn
it is, then that account's oldest job) runs 200 times; ``pick_ms_<N>`` is the mean. It
should not grow with N: it walks the ``ix_jobs_fair`` index from account to account.
The last stdout line is one JSON object. No assertions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queued", default="10000,100000", help="queue lengths, comma-separated")
    ap.add_argument("--accounts", type=int, default=3)
    ap.add_argument("--database-url", default=None)
    args = ap.parse_args()

    from sqlalchemy import delete, insert, text

    from vramq.jobs import fairness
    from vramq.jobs.db import make_engine, make_sessionmaker, migrate
    from vramq.jobs.schema import Job

    url = args.database_url or f"sqlite:///{tempfile.mkdtemp(prefix='vramq-pick-')}/pick.db"
    engine = make_engine(url)
    migrate(engine)
    sessions = make_sessionmaker(engine)
    now = datetime.now(UTC)
    result = {"database": engine.dialect.name, "accounts": args.accounts}
    for n in (int(x) for x in args.queued.split(",")):
        rows = [
            {
                "id": f"job_{i:026d}",
                "model": "m",
                "kind": "image",
                "status": "queued",
                "priority": "low",
                "input": {},
                "meta": {},
                "progress": 0.0,
                "created_at": now,
                "attempts": 0,
                "gpu_seconds": 0.0,
                "tokens_reserved": 0,
                "tokens_charged": 0,
                "usage_detail": {},
                "caller": f"acct_{i % args.accounts}",
                "saved": False,
            }
            for i in range(n)
        ]
        with sessions.begin() as s:
            s.execute(delete(Job))
            for k in range(0, n, 5000):
                s.execute(insert(Job), rows[k : k + 5000])
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE jobs"))
        with sessions() as s:
            assert fairness.pick(s, "m", "low") is not None
            t0 = time.perf_counter()
            for _ in range(200):
                fairness.pick(s, "m", "low")
            result[f"pick_ms_{n}"] = round((time.perf_counter() - t0) / 200 * 1000, 3)
        print(f"[fair_pick] {n} queued: {result[f'pick_ms_{n}']} ms a pick", file=sys.stderr, flush=True)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
