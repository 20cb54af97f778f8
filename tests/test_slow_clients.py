"""One anonymous client must not take the API down: slow sockets (headers or a body sent
a byte at a time) and event streams held open, against a real ``vramq api`` (2 gunicorn
processes × 8 threads, as ``vramq api`` runs by default), with real sockets.

The API keeps answering ``/healthz`` and ``POST /v1/jobs`` within a second throughout;
event streams past the caps are 429 with ``Retry-After``; trickling clients are cut off.
"""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest
import requests

from tests.conftest import settings_env

SLOW_CLIENTS = 24
STREAMS_ANONYMOUS = 12
STREAMS_PER_KEY = 4
KEYS = 3
PER_CALLER = 2  # VRAMQ_MAX_STREAMS_PER_CALLER for this test: the per-caller cap binds before the total
WORKERS, THREADS = 2, 8
JOB = {"model": "tiny-flux", "input": {"prompt": "x", "steps": 2}}


class Trickler:
    """Slow clients on raw sockets: half send their headers a byte at a time, half send
    whole headers with a Content-Length and then the body a byte at a time."""

    def __init__(self, port: int, count: int):
        self.socks: list[socket.socket] = []
        self.todo: list[bytes] = []
        self.cut_at: dict[int, float] = {}
        self.started = time.monotonic()
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            if i % 2 == 0:
                head, rest = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Slow: " + b"a" * 4000 + b"\r\n\r\n"
            else:
                body = b'{"model": "tiny-flux", "input": {"prompt": "' + b"a" * 900 + b'"}}'
                head = (
                    b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body)
                )
                rest = body
            s.sendall(head)
            s.setblocking(False)
            self.socks.append(s)
            self.todo.append(rest)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set() and len(self.cut_at) < len(self.socks):
            for i, s in enumerate(self.socks):
                if i in self.cut_at:
                    continue
                try:
                    readable, _, _ = select.select([s], [], [], 0)
                    if readable:  # an answer (408) or the end: the server cut it off
                        while s.recv(65536):
                            pass
                        self.cut_at[i] = time.monotonic() - self.started
                        continue
                    if self.todo[i]:
                        s.send(self.todo[i][:1])
                        self.todo[i] = self.todo[i][1:]
                except BlockingIOError:
                    continue
                except OSError:
                    self.cut_at[i] = time.monotonic() - self.started
            self.stop.wait(0.5)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for s in self.socks:
            s.close()


def timed(call) -> tuple[float, requests.Response | None]:
    t0 = time.monotonic()
    try:
        resp = call()
    except requests.RequestException:
        resp = None
    return time.monotonic() - t0, resp


def test_stream_slots_cap_per_caller_and_in_total_and_give_back_once():
    from vramq.api.streams import StreamSlots
    from vramq.jobs.errors import RateLimited

    slots = StreamSlots(per_caller=2, total=3)
    a1, a2 = slots.acquire("anon:1"), slots.acquire("anon:1")
    with pytest.raises(RateLimited, match="VRAMQ_MAX_STREAMS_PER_CALLER") as refused:
        slots.acquire("anon:1")
    assert refused.value.retry_after >= 1
    b1 = slots.acquire("acct:b")
    with pytest.raises(RateLimited, match="VRAMQ_MAX_STREAMS\\)"):
        slots.acquire("acct:c")
    a1()
    a1()  # giving back twice counts once
    assert slots.open_count() == 2
    slots.acquire("acct:c")
    a2(), b1()
    assert slots.open_count() == 1


def test_the_event_loop_buffers_small_bodies_and_leaves_large_or_chunked_ones_to_the_thread():
    from vramq.api.server import BUFFER_BODY_BYTES, _body_plan, _continue_here

    head = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\ncontent-length:  12 \r\n\r\n"
    assert _body_plan(head) == (12, False)
    assert _body_plan(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == (0, False)
    assert _body_plan(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (BUFFER_BODY_BYTES + 1)) == (0, True)
    assert _body_plan(b"POST / HTTP/1.1\r\nContent-Length: 1025\r\n\r\n", limit=1024) == (0, True)
    assert _body_plan(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n") == (0, True)
    assert _body_plan(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n") == (0, False)
    # "Expect: 100-continue" on a body the loop buffers: answered there, and taken out of the head.
    expecting = b"POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 5\r\n\r\n"
    assert _continue_here(expecting) == b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
    assert _continue_here(b"POST / HTTP/1.1\r\nExpect: x\r\nContent-Length: 5\r\n\r\n") is None  # 417 from gunicorn
    assert _continue_here(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n") is None


@pytest.mark.e2e
def test_slow_clients_and_event_streams_leave_the_api_responsive(tmp_path, redis_url, models_dir, cluster_factory):
    env = settings_env(tmp_path, redis_url=redis_url, models_dir=models_dir, max_streams_per_caller=PER_CALLER)
    cluster = cluster_factory(env)
    cluster.start_api(workers=WORKERS)
    cluster.announce_loading_worker(["tiny-flux"])  # jobs are admitted and stay queued: their streams stay open
    url = cluster.url
    port = int(url.rsplit(":", 1)[1])
    keys = [cluster.post("/v1/accounts", json={}).json()["api_key"] for _ in range(KEYS)]
    callers = [None] * STREAMS_ANONYMOUS + [k for k in keys for _ in range(STREAMS_PER_KEY)]
    job_of = {}
    for key in [None, *keys]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        made = cluster.post("/v1/jobs", json=JOB, headers=headers)
        assert made.status_code == 202, made.text
        job_of[key] = made.json()["id"]

    slow = Trickler(port, SLOW_CLIENTS)
    streams: list[requests.Response] = []
    refused: list[tuple[str | None, dict]] = []
    try:
        time.sleep(1)  # the slow clients are in before the streams are opened
        for key in callers:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            resp = requests.get(f"{url}/v1/jobs/{job_of[key]}/events", headers=headers, stream=True, timeout=(3, 5))
            if resp.status_code == 200:
                streams.append(resp)
                continue
            assert resp.status_code == 429, (resp.status_code, resp.text)
            assert resp.headers["Content-Type"] == "application/problem+json"
            assert int(resp.headers["Retry-After"]) >= 1
            refused.append((key, resp.json()))
            resp.close()

        # Caps: PER_CALLER per caller per API process, and at most half the threads of
        # each process for streams altogether.
        opened_anonymous = STREAMS_ANONYMOUS - sum(1 for k, _ in refused if k is None)
        assert 1 <= opened_anonymous <= PER_CALLER * WORKERS
        for key in keys:
            assert STREAMS_PER_KEY - sum(1 for k, _ in refused if k == key) <= PER_CALLER * WORKERS
        assert len(streams) <= WORKERS * THREADS // 2
        assert any("VRAMQ_MAX_STREAMS_PER_CALLER" in r["detail"] for k, r in refused if k is None)
        for resp in streams[:2]:  # the open ones do stream
            assert next(resp.iter_lines(decode_unicode=True)).startswith("event: ")

        # The API answers within a second, again and again, while all of that is held.
        deadline = time.monotonic() + 10
        rounds = 0
        while time.monotonic() < deadline:
            took, health = timed(lambda: requests.get(f"{url}/healthz", timeout=2))
            assert health is not None and health.status_code == 200 and took < 1, f"/healthz took {took:.2f}s"
            took, made = timed(lambda: requests.post(f"{url}/v1/jobs", json=JOB, timeout=2))
            assert made is not None and made.status_code == 202 and took < 1, f"POST /v1/jobs took {took:.2f}s"
            rounds += 1
            time.sleep(0.2)
        assert rounds >= 10

        # Trickling clients are cut off (the request read deadline), not served forever.
        wait_until = time.monotonic() + 30
        while len(slow.cut_at) < SLOW_CLIENTS and time.monotonic() < wait_until:
            time.sleep(0.5)
        assert len(slow.cut_at) == SLOW_CLIENTS, f"{SLOW_CLIENTS - len(slow.cut_at)} slow clients still connected"
    finally:
        slow.close()
        for resp in streams:
            resp.close()


def _answer(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection (or ``timeout``), and when."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data, time.monotonic() - t0


@pytest.mark.e2e
def test_bodies_read_by_threads_are_capped_and_paced_and_expect_continue_is_answered(
    tmp_path, redis_url, models_dir, cluster_factory
):
    """One API process, 8 threads: at most 2 read request bodies from clients (chunked, or
    past the event loop's buffer); a third is 503 at once; a trickling one is cut (408)."""
    cluster = cluster_factory(settings_env(tmp_path, redis_url=redis_url, models_dir=models_dir))
    cluster.start_api(workers=1)
    cluster.announce_loading_worker(["tiny-flux"])
    port = int(cluster.url.rsplit(":", 1)[1])
    post = b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"

    # Expect: 100-continue on a small body: "100 Continue" at once, then the answer.
    body = b'{"model": "tiny-flux", "input": {"prompt": "x", "steps": 2}}'
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(post + b"Expect: 100-continue\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert s.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        answer, _ = _answer(s, 5)
        assert answer.startswith(b"HTTP/1.1 202 "), answer[:200]
        assert b"100 Continue" not in answer  # once, not again from gunicorn

    # Pipelined requests (the second one sent before the first is answered) are served.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        probe = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        s.sendall(probe + probe[:20])
        time.sleep(0.3)
        s.sendall(probe[20:-2] + b"Connection: close\r\n\r\n")
        answers, _ = _answer(s, 5)
        assert answers.count(b"HTTP/1.1 200 ") == 2, answers[:600]

    held = []
    try:
        for _ in range(2):  # chunked bodies, a byte now and then: each holds a thread while it lasts
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(post + b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
            held.append(s)
        time.sleep(1)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(post + b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
            refused, took = _answer(s, 5)
        assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5\r\n" in refused and took < 1, refused[:300]
        assert b"application/problem+json" in refused
        took, health = timed(lambda: requests.get(f"{cluster.url}/healthz", timeout=2))
        assert health is not None and health.status_code == 200 and took < 1
        # Past REQUEST_READ_TIMEOUT at less than MIN_BODY_RATE: 408 and closed.
        for s in held:
            cut, took = _answer(s, 20)
            assert cut.startswith(b"HTTP/1.1 408 ") and took < 19, (took, cut[:300])
            assert b'"code": "request_timeout"' in cut or b'"code":"request_timeout"' in cut
        # Slots given back: a chunked body that arrives at once is served.
        chunk = body
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(
                post
                + b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk)
            )
            answer, _ = _answer(s, 5)
        assert answer.startswith(b"HTTP/1.1 202 "), answer[:300]
    finally:
        for s in held:
            s.close()
