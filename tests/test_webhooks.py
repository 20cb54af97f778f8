"""Webhooks: signed per Standard Webhooks (verified here with the ``standardwebhooks``
library), retried with the same id, never blocked by one slow receiver, refused at
submit for private targets. A real HTTP receiver on loopback plays the customer."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.conftest import settings_env
from tests.fixtures.http import IMAGE, Harness
from tests.fixtures.services import services_for
from vramq.api.client import verify_webhook
from vramq.jobs.errors import InputError
from vramq.jobs.schema import WebhookAttempt
from vramq.jobs.webhooks.deliverer import Deliverer
from vramq.jobs.webhooks.outbox import write as write_delivery
from vramq.jobs.webhooks.urls import check_url


class Receiver:
    """An HTTP server on loopback. Paths: /ok (204), /flaky (500 twice, then 200),
    /hang (answers after 5 s), /redirect (302 to /ok)."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.seen: list[dict] = []
        self.flaky_failures = 2
        self.sni: list[str | None] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.seen.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body, "at": time.monotonic()}
                )
                if self.path == "/hang":
                    time.sleep(5)
                if self.path == "/flaky" and receiver.flaky_failures > 0:
                    receiver.flaky_failures -= 1
                    return self._answer(500)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{receiver.port}/ok")
                    self.end_headers()
                    return None
                return self._answer(204 if self.path == "/ok" else 200)

            def _answer(self, code: int):
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the deliverer gave up waiting (the /hang case)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        if tls is not None:  # https: remember the server name each client asked for (SNI)
            tls.sni_callback = lambda sock, name, ctx: receiver.sni.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_for(self, path: str, count: int = 1, timeout: float = 20) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [r for r in self.seen if r["path"] == path]
            if len(hits) >= count:
                return hits
            time.sleep(0.05)
        raise AssertionError(f"{path}: {len([r for r in self.seen if r['path'] == path])} of {count} requests arrived")


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture
def hooks(make_settings):
    """An in-process app that lets webhooks reach loopback, and a deliverer with a short
    retry schedule running beside it."""
    settings, _ = make_settings(webhook_allow_hosts="127.0.0.1")
    h = Harness(services_for(settings))
    stop = threading.Event()
    deliverer = Deliverer(h.services, threads=4, schedule=(0.3, 0.3, 0.3), timeout=(1.0, 1.5))
    thread = threading.Thread(target=deliverer.run, args=(stop, 0.05), daemon=True)
    thread.start()
    yield h
    stop.set()
    thread.join(5)


def canceled_job(h: Harness, key: str, url: str, events=("job.canceled",)) -> dict:
    job = h.submit(key, {**IMAGE, "webhook": {"url": url, "events": list(events)}})
    assert job.status_code == 202, job.get_json()
    assert h.call("POST", f"/v1/jobs/{job.get_json()['id']}/cancel", key).status_code == 200
    return job.get_json()


def deliveries(h: Harness, key: str, job_id: str, until=lambda d: True, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        data = h.call("GET", f"/v1/jobs/{job_id}/deliveries", key).get_json()["data"]
        if data and until(data[0]) or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


def test_failing_receiver_gets_the_event_later_with_the_same_id_and_a_valid_signature(hooks, receiver):
    h = hooks
    _, key = h.account()
    secret = h.call("GET", "/v1/webhooks/secret", key).get_json()["secret"]
    assert secret.startswith("whsec_") and h.call("GET", "/v1/webhooks/secret", key).get_json()["secret"] == secret
    job = canceled_job(h, key, receiver.url("/flaky"))

    hits = receiver.wait_for("/flaky", 3)
    assert len({r["headers"]["webhook-id"] for r in hits}) == 1  # one message, three attempts
    assert hits[1]["at"] - hits[0]["at"] >= 0.25  # retried on the schedule, not at once
    last = hits[-1]
    payload = Webhook(secret).verify(last["body"], last["headers"])  # raises unless the signature is valid
    assert payload["type"] == "job.canceled" and payload["data"]["id"] == job["id"]
    assert payload["data"]["status"] == "canceled" and payload["data"]["usage"]["tokens_charged"] == 0
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(last["body"].replace(b"canceled", b"succeeded"), last["headers"])

    listed = deliveries(h, key, job["id"], until=lambda d: d["status"] == "delivered")
    assert [a["status_code"] for a in listed[0]["attempts"]] == [500, 500, 200]
    assert listed[0]["event"] == "job.canceled" and listed[0]["id"] == last["headers"]["webhook-id"]
    _, other = h.account("b")
    assert h.call("GET", f"/v1/jobs/{job['id']}/deliveries", other).status_code == 404


def test_a_receiver_that_never_answers_does_not_block_other_deliveries(hooks, receiver):
    h = hooks
    _, key = h.account()
    slow = canceled_job(h, key, receiver.url("/hang"))
    receiver.wait_for("/hang")
    fast = canceled_job(h, key, receiver.url("/ok"))
    started = time.monotonic()
    receiver.wait_for("/ok", timeout=5)
    assert time.monotonic() - started < 1.0  # while /hang still holds its connection
    timed_out = deliveries(h, key, slow["id"], until=lambda d: d["attempts"])
    assert timed_out[0]["status"] == "pending" and "Timeout" in timed_out[0]["attempts"][0]["error"]
    assert deliveries(h, key, fast["id"], until=lambda d: d["status"] == "delivered")[0]["status"] == "delivered"


def test_redirects_are_not_followed_and_the_event_filter_holds(hooks, receiver):
    h = hooks
    _, key = h.account()
    job = canceled_job(h, key, receiver.url("/redirect"))
    listed = deliveries(h, key, job["id"], until=lambda d: len(d["attempts"]) >= 2)
    assert [a["status_code"] for a in listed[0]["attempts"]][:2] == [302, 302]
    assert not [r for r in receiver.seen if r["path"] == "/ok"]
    quiet = canceled_job(h, key, receiver.url("/ok"), events=("job.succeeded", "job.failed"))
    time.sleep(0.5)
    assert h.call("GET", f"/v1/jobs/{quiet['id']}/deliveries", key).get_json()["data"] == []


@pytest.mark.parametrize(
    "url, kind",
    [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://localhost/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://192.168.0.10/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("ftp://example.com/hook", "http:// or https://"),
    ],
)
def test_private_loopback_and_link_local_targets_are_refused_at_submit(make_settings, url, kind):
    settings, _ = make_settings()
    h = Harness(services_for(settings))
    _, key = h.account()
    resp = h.submit(key, {**IMAGE, "webhook": {"url": url}})
    assert resp.status_code == 422, resp.get_json()
    problem = resp.get_json()
    assert problem["errors"][0]["loc"] == ["webhook", "url"] and kind in problem["detail"]


def test_webhook_input_errors_name_the_field(make_settings):
    settings, _ = make_settings(webhook_allow_hosts="10.0.0.0/8")
    h = Harness(services_for(settings))
    _, key = h.account()
    anon = h.submit(None, {**IMAGE, "webhook": {"url": "https://example.com/h"}})
    assert anon.status_code == 422 and anon.get_json()["errors"][0]["loc"] == ["webhook"]
    bad = h.submit(key, {**IMAGE, "webhook": {"url": "http://10.1.2.3/h", "events": ["job.done"]}})
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["loc"] == ["webhook", "events", "0"]
    allowed = h.submit(key, {**IMAGE, "webhook": {"url": "http://10.1.2.3/h"}})  # the allow list admits the network
    assert allowed.status_code == 202


@pytest.mark.e2e
def test_a_real_worker_announces_success_through_the_deliverer_process(
    tmp_path, redis_url, models_dir, cluster_factory, receiver
):
    cluster = cluster_factory(
        settings_env(tmp_path, redis_url=redis_url, models_dir=models_dir, webhook_allow_hosts="127.0.0.1")
    )
    cluster.start_api()
    cluster.start_worker(models="tiny-flux")
    cluster._spawn("dispatcher", ["webhooks-and-batches"])
    key = cluster.post("/v1/accounts", json={}).json()["api_key"]
    auth = {"Authorization": f"Bearer {key}"}
    secret = cluster.get("/v1/webhooks/secret", headers=auth).json()["secret"]
    job = cluster.post("/v1/jobs", json={**IMAGE, "webhook": {"url": receiver.url("/ok")}}, headers=auth).json()
    hit = receiver.wait_for("/ok", timeout=90)[0]
    payload = verify_webhook(secret, hit["body"], hit["headers"])  # the client's helper
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job["id"]
    assert payload["data"]["status"] == "succeeded" and payload["data"]["output"]["images"][0]["url"]
    assert payload["data"]["usage"]["tokens_charged"] >= 100
    listed = cluster.get(f"/v1/jobs/{job['id']}/deliveries", headers=auth).json()["data"]
    assert listed[0]["status"] == "delivered" and listed[0]["attempts"][0]["status_code"] == 204
    assert json.loads(hit["body"])["data"]["id"] == job["id"]


def test_the_dispatcher_command_keeps_its_old_name_as_a_hidden_alias(monkeypatch):
    """``vramq webhooks-and-batches`` delivers webhooks and finishes batches; ``vramq
    webhooks``, its old name, still runs it but is no longer listed."""
    from click.testing import CliRunner

    from vramq.api import cli

    runner = CliRunner()
    listing = runner.invoke(cli.main, ["--help"]).output
    commands = [line.split()[0] for line in listing.split("Commands:")[1].splitlines() if line.strip()]
    assert "webhooks-and-batches" in commands and "webhooks" not in commands
    ran = []
    monkeypatch.setattr(cli.webhooks_and_batches, "callback", lambda threads: ran.append(threads))
    for name in ("webhooks-and-batches", "webhooks"):
        result = runner.invoke(cli.main, [name, "--threads", "3"])
        assert result.exit_code == 0, result.output
    assert ran == [3, 3]


# --- the URL guard: one parse, pinned connections (SSRF regressions) -----------------------


def refusal(url: str, allow: tuple[str, ...] = (), resolve=socket.getaddrinfo) -> str:
    """The message ``check_url`` refuses ``url`` with (it must refuse it, naming webhook.url)."""
    with pytest.raises(InputError) as caught:
        check_url(url, allow, resolve=resolve)
    assert caught.value.errors[0]["loc"] == ["webhook", "url"], caught.value.errors
    return caught.value.errors[0]["msg"]


def answers(port, *ips: str):
    """A ``getaddrinfo`` answer holding ``ips``, in order."""
    port = int(port or 0)
    return [
        (
            socket.AF_INET6 if ":" in ip else socket.AF_INET,
            socket.SOCK_STREAM,
            socket.IPPROTO_TCP,
            "",
            (ip, port) if ":" not in ip else (ip, port, 0, 0),
        )
        for ip in ips
    ]


def fake_dns(names: dict[str, list[str]], calls: list | None = None):
    """A resolver for the names in ``names`` (each a list of successive answers, the last
    repeating); every other host goes to the real ``socket.getaddrinfo``."""
    real = socket.getaddrinfo
    left = {name: list(seq) for name, seq in names.items()}

    def resolve(host, port, *args, **kw):
        if calls is not None:
            calls.append(host)
        if host in left:
            seq = left[host]
            return answers(port, *(seq.pop(0) if len(seq) > 1 else seq[0]).split(","))
        return real(host, port, *args, **kw)

    return resolve


def outbox_row(h: Harness, url: str) -> tuple[str, str]:
    """A delivery of ``url`` written straight into the outbox (no submit check); returns its
    id and the account's signing secret."""
    account_id, key = h.account()
    with h.services.sessions.begin() as session:
        delivery_id = write_delivery(
            session, account_id, url, "job.canceled", {"id": "job_x", "status": "canceled"}, None
        )
    return delivery_id, h.call("GET", "/v1/webhooks/secret", key).get_json()["secret"]


def attempts_of(h: Harness, delivery_id: str) -> list[WebhookAttempt]:
    with h.services.sessions() as session:
        return list(session.query(WebhookAttempt).filter_by(delivery_id=delivery_id).order_by(WebhookAttempt.number))


@pytest.fixture
def local_hooks(make_settings):
    """An app whose allow list admits loopback (as the deliveries to ``Receiver`` need),
    with no deliverer running: tests call ``Deliverer.send`` themselves."""
    settings, _ = make_settings(webhook_allow_hosts="127.0.0.0/8")
    return Harness(services_for(settings))


def test_a_backslash_url_is_refused_at_submit_and_a_stored_one_is_never_sent(local_hooks, receiver):
    h = local_hooks
    url = f"http://127.0.0.1:{receiver.port}\\@1.1.1.1/ok"
    # The differential this guards against: urlsplit reads the host as 1.1.1.1, while
    # requests (WHATWG-like) would send to 127.0.0.1:<port>.
    assert urlsplit(url).hostname == "1.1.1.1"
    _, key = h.account()
    resp = h.submit(key, {**IMAGE, "webhook": {"url": url}})
    assert resp.status_code == 422, resp.get_json()
    problem = resp.get_json()
    assert problem["errors"][0]["loc"] == ["webhook", "url"] and "backslash" in problem["detail"]

    delivery_id, _ = outbox_row(h, url)  # as if it had been accepted before the fix
    Deliverer(h.services, threads=1, timeout=(1.0, 1.5)).send(delivery_id)
    time.sleep(0.3)
    assert receiver.seen == []
    [attempt] = attempts_of(h, delivery_id)
    assert attempt.status_code is None and "backslash" in attempt.error


@pytest.mark.parametrize(
    "url, reaches",
    [
        ("http://[64:ff9b::7f00:1]/h", "127.0.0.1, a loopback"),  # NAT64 well-known prefix
        ("http://[64:ff9b::a9fe:a9fe]/h", "169.254.169.254, a link-local"),  # NAT64 to cloud metadata
        ("http://[64:ff9b:1::a00:1]/h", "through IPv6-to-IPv4 translation"),  # local-use NAT64 (RFC 8215)
        ("http://[2002:a00:1::1]/h", "10.0.0.1, a private"),  # 6to4
        ("http://[::127.0.0.1]/h", "127.0.0.1, a loopback"),  # IPv4-compatible
        ("http://[::ffff:127.0.0.1]/h", "127.0.0.1, a loopback"),  # IPv4-mapped
        ("http://[::ffff:a9fe:a9fe]/h", "169.254.169.254, a link-local"),  # IPv4-mapped, hex
        ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/h", "127.0.0.1, a loopback"),  # Teredo client
    ],
)
def test_ipv6_forms_that_reach_private_ipv4_space_are_refused(url, reaches):
    msg = refusal(url)
    assert reaches in msg and "translation" in msg, msg
    # An allowed IPv6 network does not admit the IPv4 address behind it.
    assert reaches in refusal(url, allow=("::/0",))


def test_embedded_ipv4_is_what_the_allow_list_and_the_public_rule_judge(make_settings):
    assert check_url("http://[64:ff9b::101:101]/h", ()).ips == ("64:ff9b::101:101",)  # NAT64 to 1.1.1.1
    assert check_url("http://[2002:101:101::1]/h", ()).ips == ("2002:101:101::1",)  # 6to4 of 1.1.1.1
    assert "10.0.0.1" in refusal("http://[64:ff9b::a00:1]/h", allow=("64:ff9b::/96",))
    assert check_url("http://[64:ff9b::a00:1]/h", ("64:ff9b::/96", "10.0.0.0/8")).ips == ("64:ff9b::a00:1",)
    # A local-use NAT64 prefix from the allow list fixes where the IPv4 address sits (RFC 6052).
    assert "127.0.0.1" in refusal("http://[64:ff9b:1::7f00:1]/h", allow=("64:ff9b:1::/96",))
    assert check_url("http://[64:ff9b:1::7f00:1]/h", ("64:ff9b:1::/96", "127.0.0.1")).ips == ("64:ff9b:1::7f00:1",)
    # Through the API: a 422 naming the field.
    settings, _ = make_settings()
    h = Harness(services_for(settings))
    _, key = h.account()
    for url in ("http://[64:ff9b::7f00:1]/h", "http://[2002:7f00:1::]/h", "http://[::ffff:10.0.0.1]/h"):
        resp = h.submit(key, {**IMAGE, "webhook": {"url": url}})
        assert resp.status_code == 422 and resp.get_json()["errors"][0]["loc"] == ["webhook", "url"], url
        assert "translation" in resp.get_json()["detail"], url


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",
        "0x7f.1",
        "017700000001",
        "127.1",
        "0x7f000001",
        "0177.0.0.1",
        "127.0.0.01",
        "127.0.1",
        "1.2.3.4.5",
        "127.0.0.0x1",
        "example.123",
    ],
)
def test_numeric_host_shorthands_are_refused_even_where_the_address_is_allowed(host):
    msg = refusal(f"http://{host}:8080/h", allow=("127.0.0.0/8", "0.0.0.0/0"))
    assert "numeric shorthand" in msg and "a.b.c.d" in msg, msg


@pytest.mark.parametrize(
    "url, says",
    [
        ("http://1.1.1.1\\@127.0.0.1/h", "backslash"),
        ("http://1.1.1.1/\\h", "backslash"),
        ("http://user:pass@1.1.1.1/h", "user information"),
        ("http://1.1.1.1@127.0.0.1/h", "user information"),
        ("http://1.1.1.1/h\r\nX-Injected: 1", "control characters"),
        ("http://1.1.1.1\x00.example.com/h", "control characters"),
        ("http://1.1.1.1\t/h", "whitespace"),
        ("http://1.1.1.1 /h", "whitespace"),
        ("http://exam\u200bple.com/h", "control characters"),  # zero-width space (Cf)
        ("http://%31%32%37.0.0.1/h", "percent-encoded"),
        ("http://[::1%25lo]/h", "percent-encoded"),
        ("http:///h", "the host is empty"),
        ("http://:8080/h", "the host is empty"),
        ("http://1.1.1.1:0/h", "port must be a number from 1 to 65535"),
        ("http://1.1.1.1:65536/h", "port must be a number from 1 to 65535"),
        ("http://1.1.1.1:/h", "port must be a number from 1 to 65535"),
        ("http://1.1.1.1:+80/h", "port must be a number from 1 to 65535"),
        ("http://1.1.1.1:8\u0668/h", "port must be a number from 1 to 65535"),  # an Arabic-Indic digit
        ("http://exa\ufffdmple.com/h", "IDNA"),
        ("http://" + "ü" * 64 + ".com/h", "IDNA"),
        ("http://xn--a.com/h", "IDNA"),
        ("http://example.com./h", "must not end with a dot"),
        ("http://1.1.1.1./h", "must not end with a dot"),
        ("http://example..com/h", "empty label"),
        ("http://.example.com/h", "empty label"),
        ("http://1.1.1.1:80:80/h", "in brackets"),
        ("http://[::1/h", "closing"),
        ("http://[1.1.1.1]/h", "not an IPv6 address"),
        ("http:/1.1.1.1/h", "http:// or https://"),
        ("https:1.1.1.1/h", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("gopher://1.1.1.1:25/h", "http:// or https://"),
    ],
)
def test_what_two_url_parsers_could_read_differently_is_refused(url, says):
    msg = refusal(url, allow=("127.0.0.0/8", "::1", "0.0.0.0/0", "::/0"))
    assert says in msg, msg


def test_unicode_hosts_are_judged_after_idna_encoding():
    # Full-width digits and ideographic full stops fold to 127.0.0.1: judged as that address.
    assert "loopback" in refusal("http://\uff11\uff12\uff17.0.0.1/h")
    assert "loopback" in refusal("http://127\u30020\u30020\u30021/h")
    target = check_url(
        "https://b\u00fccher.example:8443/a?q=\u00fc#frag", (), resolve=fake_dns({"xn--bcher-kva.example": ["1.1.1.1"]})
    )
    assert (target.host, target.host_header, target.path, target.ips) == (
        "xn--bcher-kva.example",
        "xn--bcher-kva.example:8443",
        "/a?q=%C3%BC",
        ("1.1.1.1",),
    )


def test_dns_rebinding_cannot_move_a_delivery_to_loopback(local_hooks, receiver, monkeypatch):
    """rebind.test answers a public address to the check, then 127.0.0.1 (where the receiver
    is, and which the allow list admits) to anyone asking again: the request still goes to
    the checked address, and nothing reaches the receiver."""
    h = local_hooks
    public = "1.1.1.1"
    calls: list[str] = []
    resolve = fake_dns({"rebind.test": [public, "127.0.0.1"]}, calls)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)  # any unpinned lookup would see the rebinding

    connects: list = []
    connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", lambda sock, addr: (connects.append(addr), connect(sock, addr))[1])

    target = check_url(f"http://rebind.test:{receiver.port}/ok", (), resolve=resolve)
    assert target.ips == (public,) and target.host_header == f"rebind.test:{receiver.port}"

    delivery_id, _ = outbox_row(h, f"http://rebind.test:{receiver.port}/ok")
    deliverer = Deliverer(h.services, threads=1, timeout=(0.5, 0.5), resolve=fake_dns({"rebind.test": [public]}))
    calls.clear()
    deliverer.send(delivery_id)  # its own check sees the public address and pins it
    [attempt] = attempts_of(h, delivery_id)
    time.sleep(0.2)
    assert receiver.seen == [] and ("127.0.0.1", receiver.port) not in connects, connects
    assert (public, receiver.port) in connects  # it went (or tried to go) to the checked address
    assert attempt.status_code is None and public in attempt.error, attempt.error
    assert "rebind.test" not in calls, calls  # the sender never resolved the name again

    # The rebinding answer itself is refused at the next check (the allow list does not
    # hold 127.0.0.1 here), and an answer mixing public and loopback addresses is too.
    assert "loopback" in refusal("http://rebind.test/ok", resolve=resolve)
    assert "127.0.0.1" in refusal("http://mixed.test/ok", resolve=fake_dns({"mixed.test": [f"{public},127.0.0.1"]}))


def test_an_allowed_local_receiver_gets_a_signed_delivery_on_the_pinned_address(local_hooks, receiver):
    h = local_hooks
    url = f"http://hooks.internal.test:{receiver.port}/ok?x=1"
    delivery_id, secret = outbox_row(h, url)
    lookups: list[str] = []
    # The allow list holds 127.0.0.0/8, a network: it is matched against the resolved address.
    Deliverer(
        h.services, threads=1, timeout=(1.0, 1.5), resolve=fake_dns({"hooks.internal.test": ["127.0.0.1"]}, lookups)
    ).send(delivery_id)
    [hit] = receiver.wait_for("/ok?x=1")
    assert hit["headers"]["Host"] == f"hooks.internal.test:{receiver.port}"
    payload = Webhook(secret).verify(hit["body"], hit["headers"])
    assert payload["type"] == "job.canceled" and payload["data"]["id"] == "job_x"
    assert hit["headers"]["webhook-id"] == delivery_id and lookups == ["hooks.internal.test"]
    assert [a.status_code for a in attempts_of(h, delivery_id)] == [200]


def _self_signed(tmp_path, name: str):
    """A certificate for ``name`` (its own CA) and a server context holding it."""
    import datetime as dt

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    return str(cert_path), ctx


def test_https_to_a_pinned_address_sends_sni_and_verifies_the_certificate_for_the_name(local_hooks, tmp_path):
    h = local_hooks
    ca, ctx = _self_signed(tmp_path, "hooks.internal.test")
    tls_receiver = Receiver(tls=ctx)
    try:
        dns = {"hooks.internal.test": ["127.0.0.1"], "other.internal.test": ["127.0.0.1"]}
        deliverer = Deliverer(h.services, threads=1, timeout=(1.0, 1.5), resolve=fake_dns(dns), ca_certs=ca)
        good, secret = outbox_row(h, f"https://hooks.internal.test:{tls_receiver.port}/ok")
        deliverer.send(good)
        [hit] = tls_receiver.wait_for("/ok")
        assert tls_receiver.sni == ["hooks.internal.test"]  # SNI is the name, though the socket went to 127.0.0.1
        assert hit["headers"]["Host"] == f"hooks.internal.test:{tls_receiver.port}"
        Webhook(secret).verify(hit["body"], hit["headers"])

        # Same address, another name: the certificate does not match it, nothing is sent.
        wrong, _ = outbox_row(h, f"https://other.internal.test:{tls_receiver.port}/ok")
        deliverer.send(wrong)
        [attempt] = attempts_of(h, wrong)
        assert attempt.status_code is None and "doesn't match 'hooks.internal.test'" in attempt.error, attempt.error
        # The right name but a certificate no trusted CA signed (the default bundle): refused too.
        untrusted, _ = outbox_row(h, f"https://hooks.internal.test:{tls_receiver.port}/ok")
        Deliverer(h.services, threads=1, timeout=(1.0, 1.5), resolve=fake_dns(dns)).send(untrusted)
        [attempt] = attempts_of(h, untrusted)
        assert attempt.status_code is None and "certificate verify failed" in attempt.error, attempt.error
        assert len(tls_receiver.wait_for("/ok")) == 1
    finally:
        tls_receiver.server.shutdown()
