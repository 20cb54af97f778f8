"""Serving the API with gunicorn (threads per process, one app per process, built after fork).

gunicorn answers some requests itself, before the app sees them: a malformed request
line or header (400), a request line past ``LIMIT_REQUEST_LINE`` (414), too many or too
large headers (431). ``ProblemWorker`` makes those answers problem+json like every other
error of the API, instead of gunicorn's HTML page.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from jobs.settings import Settings

#: Bytes in the request line (method, path and query, version): gunicorn's default. The
#: API's longest URLs (signed links, cursors) are a few hundred bytes.
LIMIT_REQUEST_LINE = 4094
#: Header fields in a request (gunicorn's default is 100; a browser behind two proxies sends ~25).
LIMIT_REQUEST_FIELDS = 50
#: Bytes in one header field (gunicorn's default).
LIMIT_REQUEST_FIELD_SIZE = 8190

_GUNICORN_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long", 417: "expectation_failed",
                   431: "headers_too_large", 500: "internal_error", 501: "not_implemented"}


def write_problem(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error``, writing problem+json instead of an HTML page."""
    code = _GUNICORN_CODES.get(status_int, "bad_request" if 400 <= status_int < 500 else "internal_error")
    body = json.dumps({"type": f"https://vramq.dev/problems/{code}", "title": reason, "status": status_int,
                       "detail": mesg or reason, "code": code}).encode()  # ASCII: json.dumps escapes the rest
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/problem+json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    gunicorn_util.write_nonblock(sock, head + body)


class ProblemWorker(ThreadWorker):
    """gunicorn's threaded worker, whose own error answers are problem+json.

    ``Worker.handle_error`` decides the status and message (and logs); it writes them
    with ``gunicorn.util.write_error``, which this worker process points at
    ``write_problem`` (gunicorn's only caller of it is ``handle_error``)."""

    def init_process(self):
        gunicorn_util.write_error = write_problem
        super().init_process()

    def handle_error(self, req, client, addr, exc):
        gunicorn_util.write_error = write_problem  # in case something put the HTML one back
        super().handle_error(req, client, addr, exc)


class _Gunicorn(BaseApplication):
    def __init__(self, options: dict, extra_hosts: tuple[str, ...] = ()):
        self.options = options
        self.extra_hosts = extra_hosts
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        from .app import create_app

        settings = Settings.from_env()
        hosts = settings.allowed_hosts + tuple(h for h in self.extra_hosts if h not in settings.allowed_hosts)
        return create_app(settings.with_(allowed_hosts=hosts))


def bind_host_allowed(host: str) -> tuple[str, ...]:
    """The address ``vramq api --host`` binds, as an allowed Host: clients that reach the
    API by that address (``vramq up --host 10.0.0.5``, the partition tests' 10.x hosts)
    get links on it. A wildcard (0.0.0.0, ::) is allowed as itself only (``vramq up
    --host 0.0.0.0`` talks to http://0.0.0.0:PORT); the addresses it stands for are
    listed in VRAMQ_ALLOWED_HOSTS."""
    name = host.strip("[]").lower()
    return (name,) if name else ()


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
            "worker_class": "api.server.ProblemWorker",
            "threads": threads,
            "timeout": 120,
            "graceful_timeout": 30,
            "keepalive": 5,
            "accesslog": None,
            "child_exit": child_exit,
            "limit_request_line": LIMIT_REQUEST_LINE,
            "limit_request_fields": LIMIT_REQUEST_FIELDS,
            "limit_request_field_size": LIMIT_REQUEST_FIELD_SIZE,
        },
        extra_hosts=bind_host_allowed(host),
    ).run()
