"""``vramq workers``: one worker process per card, serving the models the planner put there.

The supervisor estimates every catalog model (``vram``), places them on the cards
(``placement``) and starts one ``vramq worker`` per card that got models, with
``CUDA_VISIBLE_DEVICES`` set to that card, its models (resident ones first) and the
card's capacity as its memory budget. It then watches them:

- a worker that dies is started again after a backoff that doubles on each quick death
  (1 s, 2 s, 4 s … at most 60 s) and resets once the worker has run for a minute;
- SIGTERM or SIGINT is passed on to every worker (Celery's warm shutdown: running jobs
  finish; messages not yet started go back to the broker, unacknowledged); a worker
  still running after the grace period is killed with its process group, and its jobs
  come back through lease expiry. No job is lost either way.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vramq.jobs import proctree

from .cards import Card
from .placement import Demand, Plan, plan
from .worker import model_needs

log = logging.getLogger("vramq.supervisor")

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 60.0
STOP_MARGIN_S = 10.0


def plan_catalog(catalog, cards: list[Card]) -> Plan:
    """Estimate each catalog model and place them on ``cards``."""
    need = model_needs(catalog, [entry.id for entry in catalog], required=True)
    return plan([Demand(m, n) for m, n in need.items()], cards)


@dataclass
class WorkerSpec:
    """One worker to keep running: its card, its models in load order, its budget."""

    card: Card
    models: list[str]
    budget_bytes: int

    @property
    def name(self) -> str:
        return f"worker-{self.card.name}"

    def argv(self) -> list[str]:
        where = ["--cpu"] if self.card.index is None else ["--card", str(self.card.index)]
        return [
            sys.executable,
            "-m",
            "vramq.api.cli",
            "worker",
            *where,
            "--models",
            ",".join(self.models),
            "--vram-budget",
            f"{self.budget_bytes // 10**6}MB",
        ]


def worker_specs(p: Plan) -> list[WorkerSpec]:
    """A worker for each card that got models; resident models first, so they load at start."""
    specs = []
    for cp in p.cards:
        ordered = [m.id for m in cp.models if m.resident] + [m.id for m in cp.models if not m.resident]
        if ordered:
            specs.append(WorkerSpec(cp.card, list(dict.fromkeys(ordered)), cp.card.capacity_bytes))
    return specs


@dataclass
class _Child:
    spec: WorkerSpec
    popen: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    backoff_s: float = BACKOFF_FIRST_S
    restarts: int = 0


@dataclass
class Supervisor:
    specs: list[WorkerSpec]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    stop_grace_s: float = 300.0
    poll_s: float = 0.2
    _children: list[_Child] = field(default_factory=list)

    def start(self) -> None:
        self._children = [_Child(spec) for spec in self.specs]
        for child in self._children:
            self._spawn(child)

    def _spawn(self, child: _Child) -> None:
        # The worker pins its card (CUDA_VISIBLE_DEVICES) itself. Its own process group:
        # stopping it reaches what it started (vLLM's engine processes); and it gets SIGTERM
        # if this supervisor dies, however it dies (jobs.proctree).
        argv = child.spec.argv() + ["--stop-grace", str(int(self.stop_grace_s))]
        child.popen = proctree.spawn(argv, env=self.env, cwd=Path(__file__).resolve().parent.parent)
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("%s started (pid %d): %s", child.spec.name, child.popen.pid, ", ".join(child.spec.models))

    def run(self, signals: proctree.StopSignals | None = None) -> int:
        """Supervise until SIGTERM/SIGINT; then stop the workers. Returns the exit code.

        ``signals``: the handlers the command installed first thing (else installed here)."""
        signals = signals or proctree.StopSignals()
        signals.running()
        try:
            self.start()
            while signals.requested is None:
                self.tick()
                time.sleep(self.poll_s)
        finally:
            self.stop()
        return 0

    def tick(self) -> None:
        """Notice dead workers and start them again when their backoff has passed."""
        now = time.monotonic()
        for child in self._children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restarts += 1
                    self._spawn(child)
                continue
            if child.popen is None:  # never started (start() spawns every child): start it now
                self._spawn(child)
                continue
            code = child.popen.poll()
            if code is None:
                continue
            proctree.kill_group(child.popen)  # whatever it left behind
            ran = now - child.started_at
            if ran >= STABLE_AFTER_S:
                child.backoff_s = BACKOFF_FIRST_S
            log.warning(
                "%s exited with code %s after %.0fs; starting it again in %.0fs",
                child.spec.name,
                code,
                ran,
                child.backoff_s,
            )
            child.restart_at = now + child.backoff_s
            child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)

    def stop(self) -> None:
        """SIGTERM every worker (running jobs finish; unstarted messages go back), SIGKILL
        the group of any still running after the grace period (its jobs come back through
        their leases)."""
        children = [c.popen for c in self._children if c.popen is not None]
        # A worker enforces the grace period itself (it hands overdue jobs back, then
        # exits); the margin lets it do that before it is killed.
        for p in proctree.terminate_all(children, self.stop_grace_s + STOP_MARGIN_S):
            log.warning(
                "worker pid %d still running after %.0fs; killed (its jobs return "
                "to the queue when their lease lapses)",
                p.pid,
                self.stop_grace_s,
            )
        self._children = []
