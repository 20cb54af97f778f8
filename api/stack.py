"""``vramq up``: the whole system on one machine — broker, API and a worker — as child processes.

With nothing configured it uses the embedded defaults (SQLite, embedded Redis, local
object directory) and builds the tiny models if they are missing. SIGTERM or SIGINT
stops the children (workers finish or give back their jobs), then the broker it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from jobs.errors import ServiceUnavailable
from jobs.settings import Settings


class Stack:
    def __init__(self, settings: Settings, port: int, host: str = "127.0.0.1", cards: list[int] | None = None,
                 log_dir: Path | None = None, api_workers: int = 2):
        self.settings = settings
        self.port = port
        self.host = host
        self.cards = cards
        self.log_dir = log_dir  # None: children write to this terminal
        self.api_workers = api_workers
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.redis_proc = None
        self.env = os.environ.copy()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, ready_timeout: float = 180) -> "Stack":
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.broker_url is None:
            from jobs.embedded import ensure_redis

            url, self.redis_proc = ensure_redis(self.settings.data_dir)
            self.env["VRAMQ_BROKER_URL"] = url
        if self.settings.catalog is None:
            from gpu_workers.tiny import make_tiny

            make_tiny(self.settings.models_dir)
        cli = [sys.executable, "-m", "api.cli"]
        self._spawn("api", cli + ["api", "--host", self.host, "--port", str(self.port), "--workers", str(self.api_workers)])
        for card in self.cards or [None]:
            args = ["--cpu"] if card is None else ["--card", str(card)]
            self._spawn("worker" if card is None else f"worker-card{card}", cli + ["worker", *args])
        self._wait_ready(ready_timeout)
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")
        # Each child leads its own process group, so stopping can reach what it started
        # (a worker's vLLM engine processes) even if the child itself is gone.
        proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
        self.children.append((name, proc))

    def _wait_ready(self, timeout: float) -> None:
        """Ready when the API says so and every worker has announced itself."""
        deadline = time.monotonic() + timeout
        want = len(self.cards or [None])
        while time.monotonic() < deadline:
            for name, proc in self.children:
                if proc.poll() is not None:
                    raise ServiceUnavailable(f"{name} exited with code {proc.returncode} during start-up")
            try:
                ready = requests.get(self.url + "/readyz", timeout=2).status_code == 200
                workers = requests.get(self.url + "/v1/workers", timeout=2).json()["data"] if ready else []
                if ready and len(workers) >= want and all(w["state"] == "ready" for w in workers):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise ServiceUnavailable(f"vramq did not become ready within {timeout:.0f}s")

    def wait(self) -> int:
        """Block until a signal asks to stop or a child dies; return the exit code."""
        stop = {"sig": None}

        def _handler(signum, _frame):
            stop["sig"] = signum

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)
        while stop["sig"] is None:
            for name, proc in self.children:
                if proc.poll() is not None:
                    print(f"vramq: {name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.2)
        return 0

    def stop(self, timeout: float = 60) -> None:
        # Workers first, so none takes a job the API can no longer report on; the API last.
        for _name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _name, proc in self.children:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child if stuck, and anything it left
            except ProcessLookupError:
                pass
            proc.wait()
        self.children.clear()
        if self.redis_proc is not None:
            from jobs.embedded import stop_redis

            stop_redis(self.redis_proc)
            self.redis_proc = None
