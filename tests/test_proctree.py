"""Every process vramq starts ends when the process that started it ends, however it ends:
``vramq up`` killed with SIGKILL while serving, or sent SIGTERM while still starting,
leaves no process of its tree behind (gunicorn, the embedded Redis, the supervisor, the
worker, vLLM's engine processes, the sweeper, the dispatcher)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

from tests.fixtures.procs import free_port, kill_pids

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def _stat(pid: int) -> tuple[int, int, str] | None:
    """``(ppid, start time, state)`` of a process, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19]), fields[0]


class Tree:
    """The processes descending from one root, followed over time: a process counts as
    part of the tree once it is seen as a child of a member, even after it is re-parented
    (its parent died) and even if it is started after the root is gone."""

    def __init__(self, root: int):
        self.members: dict[int, int] = {}  # pid -> start time (pids are reused)
        self.names: dict[int, str] = {}
        stat = _stat(root)
        assert stat is not None
        self.members[root] = stat[1]

    def refresh(self) -> None:
        procs = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (stat := _stat(int(entry))) is not None:
                procs[int(entry)] = stat
        grew = True
        while grew:
            grew = False
            for pid, (ppid, start, _state) in procs.items():
                if pid not in self.members and ppid in self.members and self._alive(ppid, procs):
                    self.members[pid] = start
                    self.names[pid] = _cmdline(pid)
                    grew = True

    def _alive(self, pid: int, procs: dict) -> bool:
        stat = procs.get(pid)
        return stat is not None and stat[1] == self.members[pid] and stat[2] != "Z"

    def alive(self) -> dict[int, str]:
        out = {}
        for pid, start in self.members.items():
            stat = _stat(pid)
            if stat is not None and stat[1] == start and stat[2] != "Z":
                out[pid] = _cmdline(pid)  # as it is now: processes rename themselves
        return out

    def wait_empty(self, timeout: float) -> dict[int, str]:
        """Follow the tree until nothing of it is alive; return what is still alive after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.refresh()
            if not self.alive():
                return {}
            time.sleep(0.2)
        return self.alive()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


def _kill_tree(tree: Tree) -> None:
    kill_pids(tree.alive())


@pytest.fixture
def up_env(tmp_path, models_dir):
    """The embedded defaults (SQLite, embedded Redis, local store) with the tiny catalog:
    every kind of child ``vramq up`` has, a vLLM engine included."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMQ_")}
    env.update(
        {
            "VRAMQ_DATA_DIR": str(tmp_path / "data"),
            "VRAMQ_MODELS_DIR": str(models_dir),
            "VRAMQ_SMALL_MODELS": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _start_up(env, tmp_path) -> tuple[subprocess.Popen, str, Tree]:
    port = free_port()
    log = open(tmp_path / "up.log", "wb")
    # Its own session, as an operator's service manager would start it: nothing of the
    # test's process group reaches its children, only what vramq itself arranges.
    up = subprocess.Popen(
        [sys.executable, "-m", "vramq.api.cli", "up", "--port", str(port), "--cpu"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return up, f"http://127.0.0.1:{port}", Tree(up.pid)


@pytest.mark.e2e
def test_up_killed_with_sigkill_while_serving_leaves_no_process(up_env, tmp_path):
    up, url, tree = _start_up(up_env, tmp_path)
    try:
        deadline = time.monotonic() + 240
        while b"vramq is up" not in (tmp_path / "up.log").read_bytes():
            assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            tree.refresh()
            time.sleep(0.5)
        assert requests.get(url + "/healthz", timeout=5).status_code == 200
        tree.refresh()
        names = " | ".join(tree.alive().values())
        # The API (gunicorn and its workers), the broker, the supervisor, the worker,
        # vLLM's engine, the sweeper and the dispatcher.
        for parts in (
            ("gunicorn",),
            ("redis-server",),
            ("workers --cpu",),
            ("worker --cpu --models", "celeryd"),
            ("sweeper",),
            ("webhooks",),
            ("VLLM::EngineCore",),
        ):
            assert any(part in names for part in parts), names  # the worker renames itself once Celery runs
        assert len(tree.alive()) >= 9, names

        os.kill(up.pid, signal.SIGKILL)
        up.wait()
        left = tree.wait_empty(30)
        assert not left, f"still alive 30 s after SIGKILL of vramq up: {left}"
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/healthz", timeout=2)
    finally:
        _kill_tree(tree)
        up.kill()
        up.wait()


@pytest.mark.e2e
def test_up_sent_sigterm_during_start_up_stops_everything(up_env, tmp_path):
    up, _url, tree = _start_up(up_env, tmp_path)
    try:
        # Wait until start-up is under way (the broker, the API and the workers started;
        # the worker still loading its models), then stop it.
        deadline = time.monotonic() + 120
        while True:
            tree.refresh()
            names = " | ".join(tree.alive().values())
            if "workers --cpu" in names and "worker --cpu" in names:
                break
            assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.1)
        assert b"vramq is up" not in (tmp_path / "up.log").read_bytes()
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0, (tmp_path / "up.log").read_text()[-3000:]
        assert b"during start-up; stopping" in (tmp_path / "up.log").read_bytes()
        left = tree.wait_empty(30)
        assert not left, f"still alive after vramq up stopped: {left}"
    finally:
        _kill_tree(tree)
        up.kill()
        up.wait()


PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    sys.path.insert(0, {root!r})
    from vramq.jobs import proctree
    proctree.children_die_with_me()
    child = proctree.spawn([sys.executable, "-c", "import time; time.sleep(600)"])
    forked = os.fork()
    if forked == 0:
        time.sleep(600)
        os._exit(0)
    # What multiprocessing's spawn does: a new interpreter that imports the main module.
    interpreter = subprocess.Popen([sys.executable, "-c", "import vramq.api.cli, time; "
                                    "open({flag!r}, 'w').close(); time.sleep(600)"], cwd={root!r})
    print(child.pid, forked, interpreter.pid, flush=True)
    time.sleep(600)
""")


def test_spawned_forked_and_interpreter_children_die_with_a_parent_killed_by_sigkill(tmp_path):
    flag = tmp_path / "imported"
    script = PARENT.format(root=str(ROOT), flag=str(flag))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        children = set(map(int, parent.stdout.readline().split()))
        deadline = time.monotonic() + 30
        while not flag.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        tree = Tree(parent.pid)
        tree.refresh()
        assert children <= set(tree.alive())
        parent.kill()
        parent.wait()
        assert tree.wait_empty(10) == {}
    finally:
        parent.kill()
        parent.wait()
