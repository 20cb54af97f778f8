"""Webhooks: signed per Standard Webhooks (verified here with the ``standardwebhooks``
library), retried with the same id, never blocked by one slow receiver, refused at
submit for private targets. A real HTTP receiver on loopback plays the customer."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook

from api.client import verify_webhook
from jobs.services import Services
from jobs.webhooks import Deliverer
from tests.conftest import settings_env
from tests.test_accounts import IMAGE, Harness


class Receiver:
    """An HTTP server on loopback. Paths: /ok (204), /flaky (500 twice, then 200),
    /hang (answers after 5 s), /redirect (302 to /ok)."""

    def __init__(self):
        self.seen: list[dict] = []
        self.flaky_failures = 2
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.seen.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                      "at": time.monotonic()})
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
    h = Harness(Services.from_settings(settings))
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
    with pytest.raises(Exception):
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


@pytest.mark.parametrize("url, kind", [
    ("http://127.0.0.1:9/hook", "loopback"),
    ("http://localhost/hook", "loopback"),
    ("http://[::1]/hook", "loopback"),
    ("http://10.1.2.3/hook", "private"),
    ("http://192.168.0.10/hook", "private"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("ftp://example.com/hook", "http:// or https://"),
])
def test_private_loopback_and_link_local_targets_are_refused_at_submit(make_settings, url, kind):
    settings, _ = make_settings()
    h = Harness(Services.from_settings(settings))
    _, key = h.account()
    resp = h.submit(key, {**IMAGE, "webhook": {"url": url}})
    assert resp.status_code == 422, resp.get_json()
    problem = resp.get_json()
    assert problem["errors"][0]["loc"] == ["webhook", "url"] and kind in problem["detail"]


def test_webhook_input_errors_name_the_field(make_settings):
    settings, _ = make_settings(webhook_allow_hosts="10.0.0.0/8")
    h = Harness(Services.from_settings(settings))
    _, key = h.account()
    anon = h.submit(None, {**IMAGE, "webhook": {"url": "https://example.com/h"}})
    assert anon.status_code == 422 and anon.get_json()["errors"][0]["loc"] == ["webhook"]
    bad = h.submit(key, {**IMAGE, "webhook": {"url": "http://10.1.2.3/h", "events": ["job.done"]}})
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["loc"] == ["webhook", "events", "0"]
    allowed = h.submit(key, {**IMAGE, "webhook": {"url": "http://10.1.2.3/h"}})  # the allow list admits the network
    assert allowed.status_code == 202


@pytest.mark.e2e
def test_a_real_worker_announces_success_through_the_deliverer_process(tmp_path, redis_url, models_dir, cluster_factory,
                                                                        receiver):
    cluster = cluster_factory(settings_env(tmp_path, redis_url=redis_url, models_dir=models_dir,
                                           webhook_allow_hosts="127.0.0.1"))
    cluster.start_api()
    cluster.start_worker(models="tiny-flux")
    cluster._spawn("webhooks", ["webhooks"])
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
