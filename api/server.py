"""Serving the API with gunicorn (threads per process, one app per process, built after fork).

**Slow clients never hold a thread.** gunicorn's stock gthread worker hands a connection
to a thread as soon as it is accepted and reads the request there, blocking: twenty
clients sending their headers (or a small body) a byte a second hold twenty threads, and
``/healthz`` stops answering. ``ProblemWorker`` reads the request in its event loop
instead, without blocking, like a buffering front (waitress, nginx): a thread is given
the connection only once the whole head (and a body declared by ``Content-Length`` of at
most ``BUFFER_BODY_BYTES`` and ``VRAMQ_MAX_BODY_KB``) is in memory, so the view never
waits on the client. That holds for kept-alive and pipelined requests too, and
``Expect: 100-continue`` on such a body is answered by the loop. A request not complete
``REQUEST_READ_TIMEOUT`` seconds after its first byte (after the connection was made, for
a new one) is answered 408 and closed.

Larger or chunked bodies (uploads, keyed batches; a Content-Length past the caller's
limit is 413 before a byte is read) are read by the thread, so they are bounded twice: at
most a ``LARGE_BODY_THREADS_DIVISOR``-th of the threads read them at once (past it 503
with Retry-After, from the loop), and at ``MIN_BODY_RATE`` bytes a second on average
after the first ``REQUEST_READ_TIMEOUT`` seconds, else the read fails (408 from the view)
and the connection is closed. A send that makes no progress for ``SEND_TIMEOUT`` seconds
(a client that stopped reading) is cut too.

Why this and not a separate buffering server (waitress) or only socket timeouts: a
per-read socket timeout does not stop a client that sends a byte every few seconds, and
a total deadline alone still lets 16 such clients hold 16 threads for its whole length;
reading in the event loop costs a thread nothing while a client dawdles. It is the same
gunicorn, the same problem+json errors, and no extra process. TLS is the reverse
proxy's (with gunicorn's own TLS, this worker uses gunicorn's stock read path). Event
streams, which do hold a thread for as long as they last, are capped per caller and per
process in ``api.streams`` (with ``VRAMQ_STREAM_SECONDS``).

gunicorn answers some requests itself, before the app sees them: a malformed request
line or header (400), a request line past ``LIMIT_REQUEST_LINE`` (414), too many or too
large headers (431). ``ProblemWorker`` makes those answers problem+json like every other
error of the API, instead of gunicorn's HTML page.
"""

from __future__ import annotations

import errno
import json
import os
import re
import selectors
import shutil
import time
from functools import partial
from pathlib import Path

from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.http.errors import NoMoreData
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import ThreadWorker

from vramq.jobs.settings import Settings

#: Bytes in the request line (method, path and query, version): gunicorn's default. The
#: API's longest URLs (signed links, cursors) are a few hundred bytes.
LIMIT_REQUEST_LINE = 4094
#: Header fields in a request (gunicorn's default is 100; a browser behind two proxies sends ~25).
LIMIT_REQUEST_FIELDS = 50
#: Bytes in one header field (gunicorn's default).
LIMIT_REQUEST_FIELD_SIZE = 8190

#: Seconds a client has to send a whole request head (and a buffered body) from its first
#: byte (from connecting, for a new connection); then 408 and the connection is closed.
REQUEST_READ_TIMEOUT = 10.0
#: A body declared by Content-Length up to this size, and up to VRAMQ_MAX_BODY_KB (a
#: longer one is refused by the app before it is read, or is an upload or a keyed batch),
#: is read in the event loop, before a thread is given the request. With the largest head
#: gunicorn accepts, a connection being read holds at most ~660 KiB.
BUFFER_BODY_BYTES = 256 * 1024
#: BUFFER_BODY_BYTES, or VRAMQ_MAX_BODY_KB when smaller (``serve`` sets it before forking).
buffer_body_bytes = BUFFER_BODY_BYTES
#: Larger and chunked bodies are read by the thread at least this fast on average (bytes
#: a second, after the first REQUEST_READ_TIMEOUT seconds).
MIN_BODY_RATE = 64 * 1024
#: Requests whose body is left to the thread (chunked, or past BUFFER_BODY_BYTES) held by a
#: process at once: at most its threads divided by this; past it 503 with Retry-After.
LARGE_BODY_THREADS_DIVISOR = 4
#: Seconds a send to the client (a response, an event of a stream) may make no progress.
SEND_TIMEOUT = 60.0
#: The most bytes a request head may have: gunicorn refuses longer ones (414, 431).
MAX_HEAD_BYTES = LIMIT_REQUEST_LINE + 2 + LIMIT_REQUEST_FIELDS * (LIMIT_REQUEST_FIELD_SIZE + 2) + 2

_GUNICORN_CODES = {
    400: "bad_request",
    403: "forbidden",
    408: "request_timeout",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    503: "service_unavailable",
}
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*([0-9]{1,18})[ \t]*(?=\r\n)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding[ \t]*:", re.IGNORECASE)
_EXPECT = re.compile(rb"\r\nexpect[ \t]*:[ \t]*([^\r\n]*?)[ \t]*(?=\r\n)", re.IGNORECASE)


class RequestReadTimeout(NoMoreData):
    """The client sent its request too slowly (``REQUEST_READ_TIMEOUT``, ``MIN_BODY_RATE``).

    gunicorn treats it as a client gone mid-request (no traceback logged, connection
    closed); a view reading the body answers 408 (``api.guards.read_body``)."""

    http_status = 408

    def __str__(self) -> str:
        return "the request arrived too slowly"


def problem_bytes(status_int: int, reason: str, mesg: str, extra: str = "") -> bytes:
    code = _GUNICORN_CODES.get(status_int, "bad_request" if 400 <= status_int < 500 else "internal_error")
    body = json.dumps(
        {
            "type": f"https://vramq.dev/problems/{code}",
            "title": reason,
            "status": status_int,
            "detail": mesg or reason,
            "code": code,
        }
    ).encode()  # ASCII: json.dumps escapes the rest
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/problem+json\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1")
    return head + body


def write_problem(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error``, writing problem+json instead of an HTML page."""
    gunicorn_util.write_nonblock(sock, problem_bytes(status_int, reason, mesg))


def _body_plan(head: bytes, limit: int | None = None) -> tuple[int, bool]:
    """For a request ``head`` (ending in a blank line): the bytes of body to read in the
    event loop (its Content-Length when at most ``limit``, by default
    ``buffer_body_bytes``), and whether a thread will read a body past them (chunked, or
    longer)."""
    limit = buffer_body_bytes if limit is None else limit
    if _CHUNKED.search(head):
        return 0, True
    lengths = _CONTENT_LENGTH.findall(head)
    if len(lengths) != 1:
        return 0, False  # no body, or several lengths (gunicorn refuses those)
    length = int(lengths[0])
    return (length, False) if length <= limit else (0, True)


def _continue_here(head: bytes) -> bytes | None:
    """``head`` without its ``Expect: 100-continue`` when the event loop should answer
    the expectation itself (the body is one it buffers); else None."""
    expect = _EXPECT.findall(head)
    wanted, _ = _body_plan(head)
    if not expect or not wanted or any(v.lower() != b"100-continue" for v in expect):
        return None
    return _EXPECT.sub(b"", head)


class ProblemWorker(ThreadWorker):
    """gunicorn's threaded worker, whose own error answers are problem+json, and which
    reads requests in its event loop (see the module's docstring).

    ``Worker.handle_error`` decides the status and message (and logs); it writes them
    with ``gunicorn.util.write_error``, which this worker process points at
    ``write_problem`` (gunicorn's only caller of it is ``handle_error``).

    Connections being read wait in ``pending_conns`` (kept in order of their deadline,
    which gunicorn's ``murder_pending`` relies on) with ``conn.buffered`` the bytes so far;
    ``murder_pending`` closes those past the deadline (after a 408 if a byte came)."""

    def init_process(self):
        gunicorn_util.write_error = write_problem
        self._large_bodies = 0
        super().init_process()

    def _buffering(self, conn) -> bool:
        return not self.cfg.is_ssl and not negotiation.prior_knowledge_allowed(self.cfg, conn.client)

    def _wait_for_request(self, conn, since: float) -> None:
        """Put ``conn`` on the poller until its request has arrived (or its time is up)."""
        conn.sock.setblocking(False)
        conn.buffered = getattr(conn, "buffered", b"")
        conn.timeout = since + REQUEST_READ_TIMEOUT
        # pending_conns stays ordered by deadline: a keep-alive connection's deadline
        # starts at its first byte, now, after every deadline already in the queue.
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))

    def accept(self, listener):
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        from gunicorn.workers.gthread import TConn

        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        if not self._buffering(conn):
            client_sock.setblocking(True)
            self.enqueue_req(conn)
            return
        self._wait_for_request(conn, time.monotonic())

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection sends its next request: read it here too."""
        if not self._buffering(conn):
            return super().on_client_socket_readable(conn, client)
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._wait_for_request(conn, time.monotonic())
        self.on_pending_socket_readable(conn, client)

    def on_pending_socket_readable(self, conn, client):
        if not self._buffering(conn):
            return super().on_pending_socket_readable(conn, client)
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._drop_pending(conn)
            self.nr_conns -= 1
            conn.close()
            return
        conn.buffered += data
        self._advance(conn)

    def _advance(self, conn) -> None:
        """Give ``conn`` to a thread once its request is in ``conn.buffered``."""
        head_end = conn.buffered.find(b"\r\n\r\n")
        unbuffered = False
        if head_end < 0:
            if len(conn.buffered) <= MAX_HEAD_BYTES:
                return
            ready = True  # too long a head: gunicorn's parser answers it (414, 431)
        else:
            head = conn.buffered[: head_end + 4]
            stripped = _continue_here(head)
            if stripped is not None:  # the client waits for "100 Continue" before its body
                conn.buffered = stripped + conn.buffered[head_end + 4 :]
                head, head_end = stripped, len(stripped) - 4
                try:
                    conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                except OSError:
                    pass
            wanted, unbuffered = _body_plan(head)
            if _EXPECT.search(head):
                wanted = 0  # gunicorn answers the expectation (100, or 417)
            ready = len(conn.buffered) >= head_end + 4 + wanted
        if ready:
            self._drop_pending(conn)
            self._dispatch(conn, unbuffered)

    def _drop_pending(self, conn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            self.pending_conns.remove(conn)
        except ValueError:
            pass

    def _dispatch(self, conn, unbuffered: bool = False) -> None:
        """Give the buffered request to a thread: it reads from the buffer first. At most
        a LARGE_BODY_THREADS_DIVISOR-th of the threads read bodies from clients (503)."""
        from gunicorn import http

        if unbuffered:
            if self._large_bodies >= max(1, self.cfg.threads // LARGE_BODY_THREADS_DIVISOR):
                try:
                    conn.sock.send(
                        problem_bytes(
                            503,
                            "Service Unavailable",
                            "too many large or chunked request bodies are being received by "
                            "this API process; try again shortly",
                            "Retry-After: 5\r\n",
                        )
                    )
                except OSError:
                    pass
                self.nr_conns -= 1
                conn.close()
                return
            self._large_bodies += 1
            conn.large_body = True
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(conn.buffered)
        conn.buffered = b""
        conn.data_ready = True
        self.enqueue_req(conn)

    def murder_pending(self):
        now = time.monotonic()
        while self.pending_conns and self.pending_conns[0].timeout <= now:
            conn = self.pending_conns.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
            self.nr_conns -= 1
            if getattr(conn, "buffered", b""):
                try:
                    conn.sock.send(
                        problem_bytes(
                            408,
                            "Request Timeout",
                            f"the request did not arrive within {REQUEST_READ_TIMEOUT:g} seconds",
                        )
                    )
                except OSError:
                    pass
            conn.close()

    def handle(self, conn):
        """Serve one request in a thread: the body past the buffer is read at MIN_BODY_RATE
        at least, and sends that make no progress for SEND_TIMEOUT fail."""
        if self._buffering(conn) and conn.parser is not None:
            conn.initialized = True
            _pace(conn.parser.unreader, conn.sock)
        return super().handle(conn)

    def handle_request(self, req, conn):
        if self._buffering(conn):
            conn.sock.settimeout(SEND_TIMEOUT)  # after gunicorn made the socket blocking
        return super().handle_request(req, conn)

    def finish_request(self, conn, fs):
        if getattr(conn, "large_body", False):
            conn.large_body = False
            self._large_bodies -= 1
        if conn.sock.fileno() >= 0 and self._buffering(conn):
            try:
                conn.sock.settimeout(None)
                keep = not fs.cancelled() and fs.exception() is None and fs.result() is True
                if keep and self.alive and conn.parser is not None and conn.parser.unreader.buf.getvalue():
                    # The client sent its next request already (pipelining, or bytes read
                    # ahead): it is read here like any other, not by a waiting thread.
                    conn.buffered = conn.parser.unreader.take_buffered()
                    self._wait_for_request(conn, time.monotonic())
                    self._advance(conn)
                    return
            except Exception:
                self.nr_conns -= 1
                conn.close()
                return
        super().finish_request(conn, fs)

    def handle_error(self, req, client, addr, exc):
        gunicorn_util.write_error = write_problem  # in case something put the HTML one back
        super().handle_error(req, client, addr, exc)


def _pace(unreader, sock) -> None:
    """Make ``unreader`` (gunicorn's socket reader) fail with RequestReadTimeout when the
    client sends slower than MIN_BODY_RATE on average after REQUEST_READ_TIMEOUT."""
    start = time.monotonic()
    state = {"read": 0}

    def chunk(size_hint=None):
        deadline = start + REQUEST_READ_TIMEOUT + state["read"] / MIN_BODY_RATE
        left = deadline - time.monotonic()
        if left <= 0:
            raise RequestReadTimeout()
        prior = sock.gettimeout()  # SEND_TIMEOUT, or a shorter one of gunicorn's (finish_body)
        sock.settimeout(min(left, prior or SEND_TIMEOUT))
        try:
            size = unreader.mxchunk
            if size_hint and size_hint > size:
                size = min(size_hint, unreader.max_body_chunk)
            data = sock.recv(size)
        except TimeoutError:
            raise RequestReadTimeout() from None
        finally:
            sock.settimeout(prior)
        state["read"] += len(data)
        return data

    unreader.chunk = chunk


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
        from .streams import slots_for
        from .wiring import services

        settings = Settings.from_env()
        hosts = settings.allowed_hosts + tuple(h for h in self.extra_hosts if h not in settings.allowed_hosts)
        # ``serve`` migrated before forking this worker: no second migration per worker.
        app = create_app(services=services(settings.with_(allowed_hosts=hosts), migrate_db=False))
        app.extensions["vramq.streams"] = slots_for(settings, int(self.options.get("threads", 1)))
        return app


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
    from .wiring import services as wired_services

    wired_services(settings)
    global buffer_body_bytes
    buffer_body_bytes = min(BUFFER_BODY_BYTES, settings.max_body_bytes)

    def child_exit(server, worker):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)

    _Gunicorn(
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "worker_class": "vramq.api.server.ProblemWorker",
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
