"""Serving the API with gunicorn (threads per process, one app per process, built after fork)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gunicorn.app.base import BaseApplication

from jobs.settings import Settings


class _Gunicorn(BaseApplication):
    def __init__(self, options: dict):
        self.options = options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        from .app import create_app

        return create_app()


def serve(host: str, port: int, workers: int, threads: int, settings: Settings) -> None:
    """Run the API until SIGTERM/SIGINT (gunicorn finishes in-flight requests first)."""
    # Counters from every gunicorn process are summed at scrape time through this folder.
    prom = Path(settings.data_dir) / "prometheus" / str(port)
    shutil.rmtree(prom, ignore_errors=True)
    prom.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    # Migrate (and start the embedded broker) once, before forking request workers.
    from jobs.services import Services

    Services.from_settings(settings)

    def child_exit(server, worker):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)

    _Gunicorn(
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "worker_class": "gthread",
            "threads": threads,
            "timeout": 120,
            "graceful_timeout": 30,
            "keepalive": 5,
            "accesslog": None,
            "child_exit": child_exit,
        }
    ).run()
