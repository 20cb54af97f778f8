"""The HTTP contract against a real ``vramq api`` + worker: validation, idempotency,
errors as problem+json, signed links, operations endpoints."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

import pytest
import requests

from tests.fixtures.http import assert_problem, read_sse

pytestmark = pytest.mark.e2e

GOOD = {"model": "tiny-flux", "input": {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}}


def with_input(**changes):
    inp = {**GOOD["input"], **changes}
    return {**GOOD, "input": {k: v for k, v in inp.items() if v is not ...}}


@pytest.mark.parametrize(
    "body, loc, needle",
    [
        (with_input(width=1024), ["input", "width"], "512 (limit max_width"),
        (with_input(height=16), ["input", "height"], "32 (limit min_side"),
        (with_input(width=100), ["input", "width"], "multiple of 16"),
        (with_input(steps=51), ["input", "steps"], "50 (limit max_steps"),
        (with_input(steps=0), ["input", "steps"], "1"),
        (with_input(num_images=5), ["input", "num_images"], "4"),
        (with_input(seed=-1), ["input", "seed"], "0"),
        (with_input(prompt="x" * 2001), ["input", "prompt"], "2000"),
        (with_input(width="wide"), ["input", "width"], "integer"),
        (with_input(steps=2.5), ["input", "steps"], "integer"),
        (with_input(prompt=None), ["input", "prompt"], "string"),
        (with_input(prompt=...), ["input", "prompt"], "required"),
        (with_input(colour="red"), ["input", "colour"], "not permitted"),
        ({"input": GOOD["input"]}, ["model"], "required"),
        ({"model": "tiny-flux"}, ["input"], "required"),
        ({**GOOD, "priority": "urgent"}, ["priority"], "high"),
        ({**GOOD, "input": "draw a cat"}, ["input"], "dictionary"),
        ({**GOOD, "webhook": {"url": "https://example.com/hook"}}, ["webhook"], "API key"),
        ({**GOOD, "metadata": {"blob": "x" * 5000}}, ["metadata"], "4096"),
        ({**GOOD, "extra": 1}, ["extra"], "not permitted"),
    ],
)
def test_invalid_input_is_422_naming_the_field(shared_cluster, body, loc, needle):
    problem = assert_problem(shared_cluster.post("/v1/jobs", json=body), 422, "invalid_input", loc)
    msgs = " ".join(e["msg"] for e in problem["errors"] if e["loc"] == loc)
    assert needle.lower() in msgs.lower(), problem


def test_unknown_model(shared_cluster):
    problem = assert_problem(
        shared_cluster.post("/v1/jobs", json={**GOOD, "model": "gpt-9"}), 422, "unknown_model", ["model"]
    )
    assert "gpt-9" in problem["detail"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b'{"model": "tiny-flux",'])
def test_malformed_json_is_400(shared_cluster, raw):
    assert_problem(
        shared_cluster.post("/v1/jobs", data=raw, headers={"Content-Type": "application/json"}), 400, "invalid_input"
    )


def test_body_not_an_object(shared_cluster):
    assert_problem(shared_cluster.post("/v1/jobs", json=[GOOD]), 422, "invalid_input")


def test_oversized_body_is_413(shared_cluster):
    body = with_input(prompt="x" * (70 * 1024))  # the cluster caps bodies at 64 KiB
    problem = assert_problem(shared_cluster.post("/v1/jobs", json=body), 413, "payload_too_large")
    assert str(64 * 1024) in problem["detail"]


def test_oversized_chunked_body_is_413(shared_cluster):
    def chunks():
        for _ in range(80):
            yield b"x" * 1024

    resp = shared_cluster.post("/v1/jobs", data=chunks(), headers={"Content-Type": "application/json"})
    assert_problem(resp, 413, "payload_too_large")


def test_not_found_and_method_errors_are_problems(shared_cluster):
    assert_problem(shared_cluster.get("/v1/jobs/job_doesnotexist"), 404, "not_found")
    assert_problem(shared_cluster.post("/v1/jobs/job_doesnotexist/cancel"), 404, "not_found")
    assert_problem(shared_cluster.get("/v1/nothing-here"), 404, "not_found")
    assert_problem(requests.delete(shared_cluster.url + "/v1/jobs", timeout=5), 405, "method_not_allowed")
    assert_problem(shared_cluster.get("/v1/models/gpt-9"), 404, "not_found")
    assert_problem(shared_cluster.get("/v1/jobs"), 401, "unauthorized")


def test_idempotency_key(shared_cluster):
    key = {"Idempotency-Key": f"k-{time.time_ns()}"}
    first = shared_cluster.post("/v1/jobs", json=GOOD, headers=key)
    again = shared_cluster.post("/v1/jobs", json=GOOD, headers=key)
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = shared_cluster.post("/v1/jobs", json=with_input(prompt="another"), headers=key)
    assert_problem(other, 409, "conflict")
    # Without the key, the same body is a new job.
    assert shared_cluster.post("/v1/jobs", json=GOOD).json()["id"] != first.json()["id"]


def test_seed_is_chosen_at_submit_and_shown(shared_cluster):
    job = shared_cluster.post("/v1/jobs", json=GOOD).json()
    assert isinstance(job["input"]["seed"], int)
    assert job["input"]["num_images"] == 1 and job["input"]["guidance"] == 0.0  # catalog defaults filled in
    done = shared_cluster.wait_job(job["id"])
    assert done["output"]["images"][0]["seed"] == job["input"]["seed"]


def test_same_seed_same_image(shared_cluster):
    body = with_input(seed=1234, prompt="same")
    a = shared_cluster.wait_job(shared_cluster.post("/v1/jobs", json=body).json()["id"])
    b = shared_cluster.wait_job(shared_cluster.post("/v1/jobs", json=body).json()["id"])
    get = lambda job: requests.get(job["output"]["images"][0]["url"], timeout=10).content
    assert get(a) == get(b)


def _tamper(url: str, **changes) -> str:
    parts = urlparse(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    path = changes.pop("path", parts.path)
    query.update(changes)
    return urlunparse(parts._replace(path=path, query=urlencode(query)))


def test_signed_links_refuse_tampering_and_expiry(shared_cluster):
    job = shared_cluster.wait_job(shared_cluster.post("/v1/jobs", json=with_input(num_images=2)).json()["id"])
    url, other = (i["url"] for i in job["output"]["images"])
    assert requests.get(url, timeout=5).status_code == 200
    sig = parse_qs(urlparse(url).query)["sig"][0]
    expires = int(parse_qs(urlparse(url).query)["expires"][0])
    bad_sig = _tamper(url, sig=("0" if sig[0] != "0" else "1") + sig[1:])
    later = _tamper(url, expires=str(expires + 3600))
    swapped = _tamper(url, path=urlparse(other).path)  # a valid signature for another object
    for bad in (bad_sig, later, swapped, _tamper(url, sig="")):
        assert_problem(requests.get(bad, timeout=5), 403, "forbidden")

    from vramq.storage.local import LocalStore

    env = shared_cluster.env
    store = LocalStore(__import__("pathlib").Path(env["VRAMQ_DATA_DIR"]) / "objects", env["VRAMQ_SECRET_KEY"])
    key = urlparse(url).path.split("/v1/blobs/", 1)[1]
    short = shared_cluster.url + store.signed_url(key, 1)
    assert requests.get(short, timeout=5).status_code == 200
    time.sleep(2.1)
    problem = assert_problem(requests.get(short, timeout=5), 403, "forbidden")
    assert "expired" in problem["detail"]


def test_models_and_workers(shared_cluster):
    models = shared_cluster.get("/v1/models").json()["data"]
    flux = next(m for m in models if m["id"] == "tiny-flux")
    assert flux["kind"] == "image" and flux["backend"] == "diffusers"
    assert flux["available"] is True and flux["limits"]["max_width"] == 512
    assert isinstance(flux["queue_depth"], int)
    assert shared_cluster.get("/v1/models/tiny-flux").json()["id"] == "tiny-flux"
    workers = shared_cluster.workers()
    assert workers and "tiny-flux" in workers[0]["models"] and workers[0]["card"] == "cpu"


def test_operations_endpoints(shared_cluster):
    assert shared_cluster.get("/healthz").json() == {"status": "ok"}
    ready = shared_cluster.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    shared_cluster.post("/v1/jobs", json=GOOD)
    metrics = shared_cluster.get("/metrics").text
    assert 'vramq_jobs_submitted_total{model="tiny-flux"}' in metrics
    assert 'vramq_jobs{model="tiny-flux",status=' in metrics
    spec = shared_cluster.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/events",
        "/v1/files",
        "/v1/models",
        "/v1/workers",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(spec["paths"])
    width = spec["components"]["schemas"]["Input_tiny-flux"]["properties"]["width"]
    assert width["maximum"] == 512 and width["multipleOf"] == 16


def test_events_stream_ends_with_done(shared_cluster):
    job = shared_cluster.post("/v1/jobs", json=with_input(steps=8)).json()
    events = []
    with requests.get(shared_cluster.url + f"/v1/jobs/{job['id']}/events", stream=True, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                events.append(line[7:])
            if events and events[-1] == "done":
                break
    assert events[0] == "status" and events[-1] == "done" and "progress" in events


def test_events_resume_after_last_event_id(shared_cluster):
    job = shared_cluster.wait_job(shared_cluster.post("/v1/jobs", json=with_input(steps=6)).json()["id"])
    url = shared_cluster.url + f"/v1/jobs/{job['id']}/events"
    with requests.get(url, stream=True, timeout=30) as resp:
        full = read_sse(resp)
    kinds = [e for _i, e, _d in full]
    assert kinds[0] == "status" and kinds[-1] == "done" and "running" in [d.get("status") for _i, e, d in full]
    assert full[-1][2]["status"] == "succeeded" and full[-1][2]["output"]["images"]
    ids = [i for i, _e, _d in full if i]
    assert ids == sorted(ids, key=lambda x: tuple(map(int, x.split("-"))))
    # Resume after the second event: exactly the events after it, same ids.
    with requests.get(url, stream=True, timeout=30, headers={"Last-Event-ID": ids[1]}) as resp:
        resumed = read_sse(resp)
    assert [i for i, _e, _d in resumed] == ids[2:]
