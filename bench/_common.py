"""Helpers the benchmarks share: ports, timestamps, CPU accounting of process trees,
building the tiny models in a child process, waiting for a vramq deployment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import requests

from vramq.jobs import proctree

ROOT = Path(__file__).resolve().parent.parent
#: Benchmarks measure the system, not the quota: one client address sends thousands of
#: jobs, so the anonymous allowance and rate limit are lifted for them.
UNMETERED = {"VRAMQ_ANONYMOUS_DAILY_TOKENS": "1000000000", "VRAMQ_RATE_LIMIT_ANONYMOUS": "0"}
_TCK = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_ts(value: str) -> float:
    """An API timestamp (ISO 8601, ``Z``) as POSIX seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (not idle, not iowait)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / _TCK


def _proc_stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children of all its threads, recursively)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    kids = [int(c) for c in fh.read().split()]
                out.extend(kids)
                todo.extend(kids)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def tree_cpu_s(pid: int) -> float:
    """user+system CPU seconds of a process and its live descendants (0 if gone)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            f = _proc_stat(p)
            total += (int(f[11]) + int(f[12])) / _TCK
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total


def in_session(sid: int) -> list[int]:
    """Live processes whose session or process group is ``sid`` (a spawned child's pid)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                f = _proc_stat(int(name))
                if int(f[2]) == sid or int(f[3]) == sid:  # pgrp, session
                    out.append(int(name))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    return out


class CpuMeter:
    """Where the CPU went during a phase: ours by part, and everything else on the machine."""

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


class Procs:
    """A benchmark's vramq subprocesses, each started by ``jobs.proctree.spawn``: in a
    session of its own, so that stopping it takes down everything it started (vLLM's
    engine core and its workers included), and bound to die with the benchmark."""

    def __init__(self, env: dict[str, str], logdir: Path, log=lambda msg: None):
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.logdir = logdir
        self.log = log
        self.children: list[tuple[str, subprocess.Popen, Path]] = []

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        path = self.logdir / f"{name}.log"
        with open(path, "wb") as out:  # the child keeps its own copy of the descriptor
            proc = proctree.spawn(
                [sys.executable, "-m", "vramq.api.cli", *args],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.children.append((name, proc, path))
        return proc

    def check_alive(self) -> None:
        for name, proc, path in self.children:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{path.read_text(errors='replace')[-3000:]}")

    def stop(self, grace_s: float = 30) -> list[int]:
        """SIGTERM (worker first, API last), then SIGKILL to each whole process group;
        returns the pids of the groups' processes still alive afterwards (should be none)."""
        overdue = proctree.terminate_all([proc for _, proc, _ in reversed(self.children)], grace_s)
        for name, proc, _ in self.children:
            if proc in overdue:
                self.log(f"{name} ignored SIGTERM for {grace_s:g}s")
        deadline = time.monotonic() + 10
        while True:
            left = [p for _, proc, _ in self.children for p in in_session(proc.pid)]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)


def announce_loading_worker(broker, models: list[str]) -> None:
    """Keep announcing (in a daemon thread) a worker that is still "loading" ``models``:
    the API admits jobs only for models a live worker serves, and such a worker takes
    none of them, so what is measured is the API alone."""
    import threading

    from vramq.jobs import heartbeat

    def announce() -> None:
        while True:
            heartbeat.announce(
                broker,
                "bench-loading",
                {
                    "name": "bench-loading",
                    "card": "cpu",
                    "models": models,
                    "pid": 0,
                    "host": "bench",
                    "state": "loading",
                    "running": 0,
                },
            )
            time.sleep(5)

    threading.Thread(target=announce, daemon=True).start()


def build_model(module: str, function: str, dest: Path) -> Path:
    """Build a tiny model (unless built) in a child process: building imports torch and
    transformers, which would stay in this process and slow the direct baseline down
    (a bigger heap makes every ``gc.collect()`` longer; faster-whisper runs one per file)."""
    code = f"from {module} import {function}; {function}({str(dest)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return dest


def wait_ready(url: str, procs, worker_pid: int | None, timeout: float = 300) -> None:
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


def vramq_env(data: Path, models: Path, catalog: Path, broker_url: str, database_url: str | None) -> dict[str, str]:
    """The ``VRAMQ_*`` settings of a benchmark's own installation (unmetered; SQLite in
    ``data`` unless ``database_url``)."""
    env = {
        "VRAMQ_DATA_DIR": str(data),
        "VRAMQ_CATALOG": str(catalog),
        "VRAMQ_BROKER_URL": broker_url,
        "VRAMQ_MODELS_DIR": str(models),
        "VRAMQ_SECRET_KEY": "bench-" + uuid.uuid4().hex,
        **UNMETERED,
    }
    if database_url:
        env["VRAMQ_DATABASE_URL"] = database_url
    return env


ENGINE_CPU, QUEUE_CPU = 1, 0
"""``--pin``: the model's engine on one core, the queue (API, client) on the other."""


def pin(pid: int, cpu: int, tree: bool = True) -> None:
    """Bind ``pid`` (and, with ``tree``, its descendants), threads included, to ``cpu``; a
    process it starts later inherits the binding. vLLM's CPU backend binds its OpenMP threads itself: pinned
    runs set ``VLLM_CPU_OMP_THREADS_BIND`` to the engine's core (``pin_engine_env``)."""
    for p in [pid, *(descendants(pid) if tree else [])]:
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                os.sched_setaffinity(int(task), {cpu})
        except (FileNotFoundError, ProcessLookupError):
            pass


def pin_engine_env() -> None:
    """vLLM's OpenMP threads on the engine's core (inherited by the worker it starts)."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(ENGINE_CPU)


def pin_vramq(api_pid: int, worker_pid: int) -> None:
    """vramq's processes (the API and the worker's own process) on the queue's core, the
    worker's engine processes (its descendants) on the engine's."""
    pin(api_pid, QUEUE_CPU)
    pin(worker_pid, QUEUE_CPU, tree=False)
    for child in descendants(worker_pid):
        pin(child, ENGINE_CPU)


def start_vramq(
    procs: Procs, model_id: str, api_workers: int, pinned: bool
) -> tuple[str, subprocess.Popen, subprocess.Popen]:
    """``vramq api`` (which migrates the database first), then ``vramq worker --cpu`` for
    ``model_id``, each ready; with ``pinned``, the engine's core and vramq's as ``--pin``
    puts them. Returns ``(url, api, worker)``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = procs.spawn("api", ["api", "--port", str(port), "--workers", str(api_workers)])
    wait_ready(url, procs, None)
    worker = procs.spawn("worker", ["worker", "--cpu", "--models", model_id])
    if pinned:
        pin(worker.pid, ENGINE_CPU)  # the engine's processes it starts inherit it
    wait_ready(url, procs, worker.pid)
    if pinned:
        pin_vramq(api.pid, worker.pid)
    return url, api, worker
