"""Processes vramq starts, and how they end with the process that started them.

Every child vramq starts (the API, the embedded Redis, the worker supervisor, workers,
the sweeper, the webhook dispatcher) is started by ``spawn``:

- in a session of its own, so a Ctrl-C meant for the parent does not reach it first and
  ``kill_group`` can reach everything it started in turn (a worker's vLLM engine);
- with the kernel's parent-death signal (Linux ``PR_SET_PDEATHSIG``): when the parent
  dies, however it dies (SIGKILL included), the child gets SIGTERM and stops the way it
  stops on a plain SIGTERM, passing it down to its own children the same way. A child
  whose parent died in the instant before the signal was armed exits at once.

Processes that libraries start inside a vramq process (vLLM's engine core) are covered
by ``children_die_with_me``. Where the kernel has no parent-death signal (not Linux),
children outlive a parent killed with SIGKILL; a clean SIGTERM still stops them.

``StopSignals`` turns SIGTERM and SIGINT into an exception while a process is starting
up (so a start-up interrupted at any moment goes through the same ``finally`` that stops
what was started), and into a flag once it is running.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import IO, Any

_PR_SET_PDEATHSIG = 1
# Loaded before any fork: the child side of ``spawn`` must not load libraries.
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only)."""
    if _libc is None:
        return False
    status: int = _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return status == 0


def spawn(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, bound to die (SIGTERM) when this process dies."""
    parent = os.getpid()

    def bind_to_parent() -> None:  # runs in the child, between fork and exec
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=stdout, stderr=stderr, start_new_session=True, preexec_fn=bind_to_parent
    )


_CHILDREN_DIE_WITH = "VRAMQ_CHILDREN_DIE_WITH"


def children_die_with_me() -> None:
    """Every process a library starts from this one from now on (vLLM's engine core, by
    fork or by multiprocessing's spawn) gets SIGTERM when this one dies, however it dies.

    A forked child is bound by a fork hook. A spawned child is a new interpreter that
    imports this program's main module (``api.cli``), which calls ``bind_if_asked``: the
    variable set here names the parent that wants it."""
    if _libc is None:
        return
    os.environ[_CHILDREN_DIE_WITH] = str(os.getpid())
    os.register_at_fork(after_in_child=lambda: set_parent_death_signal(signal.SIGTERM))


def bind_if_asked() -> None:
    """Called as ``api.cli`` is imported: bind this process to its parent if the parent
    asked for it with ``children_die_with_me``."""
    if os.environ.get(_CHILDREN_DIE_WITH) == str(os.getppid()):
        set_parent_death_signal(signal.SIGTERM)


def signal_group(popen: subprocess.Popen[Any], sig: int) -> bool:
    """Send ``sig`` to the whole process group a ``spawn``ed child leads (the child and
    everything it started): SIGKILL, or SIGSTOP and SIGCONT to pause and resume it all.
    False if the group is gone."""
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def kill_group(popen: subprocess.Popen[Any]) -> None:
    """SIGKILL the child's whole process group (the child and anything it left), then reap it."""
    signal_group(popen, signal.SIGKILL)
    popen.wait()


def terminate_all(children: list[subprocess.Popen[Any]], grace_s: float) -> list[subprocess.Popen[Any]]:
    """SIGTERM every live child, wait up to ``grace_s`` for all of them, then SIGKILL the
    process group of each (whatever is left of it). Returns the children that had to be
    killed because they outlived the grace period."""
    import time

    live = [p for p in children if p.poll() is None]
    for p in live:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    overdue: list[subprocess.Popen[Any]] = []
    for p in live:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            overdue.append(p)
    for p in children:
        kill_group(p)
    return overdue


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived while the process was starting up.

    A BaseException, like KeyboardInterrupt, so no ``except Exception`` on the way
    swallows it."""


class StopSignals:
    """SIGTERM/SIGINT handling, installed as the first thing a long-running command does.

    While ``raising`` (start-up), a signal raises ``StopRequested`` in the main thread;
    afterwards it only sets ``requested``, for a loop that checks it. A second signal
    while stopping is ignored: stopping is already under way.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self.raising = True
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        first = self.requested is None
        self.requested = self.requested or signum
        if first and self.raising:
            self.raising = False
            raise StopRequested(signal.Signals(signum).name)

    def running(self) -> None:
        """Start-up is over: from now on a signal only sets ``requested``."""
        self.raising = False
