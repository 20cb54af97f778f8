"""Batches, fair turns between accounts, and the results manifest.

In process (real Flask app, real Redis, PostgreSQL and SQLite) for acceptance, atomicity,
cancel and the manifest; real API, worker and dispatcher processes for fairness under a
2,000-job batch and for a batch run to the end.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
import requests
from sqlalchemy import func, select

from tests.conftest import settings_env
from tests.fixtures.http import Harness
from tests.fixtures.services import services_for
from vramq.jobs import fairness, ledger, lifecycle
from vramq.jobs.batches import creation
from vramq.jobs.batches.finisher import Finisher
from vramq.jobs.batches.parsing import MAX_JOBS
from vramq.jobs.db import writing
from vramq.jobs.queue import PRIORITY, queue_name
from vramq.jobs.schema import Batch, Job, LedgerEntry, WebhookDelivery

INPUT = {"prompt": "a fox", "width": 64, "height": 64, "steps": 2}


def lines(n: int, model: str = "tiny-flux", start: int = 0) -> list[dict]:
    return [
        {"custom_id": f"frame-{i:05d}", "model": model, "input": {**INPUT, "seed": i}} for i in range(start, start + n)
    ]


@pytest.fixture(params=["postgresql", "sqlite"])
def h(request, make_settings):
    env = {"webhook_allow_hosts": "127.0.0.1", "free_daily_tokens": 5000}
    if request.param == "postgresql":
        env["database_url"] = request.getfixturevalue("pg_url")
    settings, _ = make_settings(**env)
    return Harness(services_for(settings))


def messages(h: Harness, model: str = "tiny-flux", priority: str = "low") -> int:
    key = queue_name(model) + (f"\x06\x16{PRIORITY[priority]}" if PRIORITY[priority] else "")
    return h.services.redis.llen(key)


def count(h: Harness, table) -> int:
    with h.services.sessions() as s:
        return s.execute(select(func.count()).select_from(table)).scalar_one()


def finish(h: Harness) -> int:
    """One round of the dispatcher's batch finisher."""
    return Finisher(h.services, every_s=0).tick()


# --- accepting ------------------------------------------------------------------------


def test_a_batch_is_accepted_whole_reserved_per_job_and_listed_in_order(h):
    acct, key = h.account()
    resp = h.call("POST", "/v1/batches", key, json={"jobs": lines(25), "metadata": {"shot": "A"}})
    assert resp.status_code == 202, resp.get_json()
    b = resp.get_json()
    assert b["object"] == "batch" and b["id"].startswith("batch_") and b["status"] == "queued"
    assert b["priority"] == "low"  # the default for batches
    assert b["counts"] == {"queued": 25, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0, "total": 25}
    assert b["usage"]["tokens_reserved"] == 25 * 100 and b["results_url"] is None
    assert messages(h) == 25  # one turn per job, on the low-priority list
    with h.services.sessions() as s:
        rows = s.execute(select(LedgerEntry).where(LedgerEntry.caller == acct)).scalars().all()
        assert sorted(r.entry for r in rows) == ["reserve"] * 25 and len({r.job_id for r in rows}) == 25
        assert ledger.audit(s, acct, ledger.day_of(h.now)) == (2500, 0)
    assert h.usage(key)["used_today"] == 2500

    seen, cursor = [], None
    while True:
        page = h.call("GET", f"/v1/batches/{b['id']}/jobs?limit=10" + (f"&cursor={cursor}" if cursor else ""), key)
        assert page.status_code == 200
        seen += page.get_json()["data"]
        cursor = page.get_json()["next_cursor"]
        if cursor is None:
            break
    assert [j["custom_id"] for j in seen] == [f"frame-{i:05d}" for i in range(25)]
    assert all(
        j["batch_id"] == b["id"] and j["priority"] == "low" and j["input"]["seed"] == i for i, j in enumerate(seen)
    )
    one = h.call("GET", f"/v1/jobs/{seen[3]['id']}", key).get_json()
    assert one["custom_id"] == "frame-00003" and one["queue_position"] == 3

    other = h.account("b")[1]
    assert h.call("GET", f"/v1/batches/{b['id']}", other).status_code == 404
    assert h.call("GET", f"/v1/batches/{b['id']}/jobs", other).status_code == 404
    assert h.call("POST", f"/v1/batches/{b['id']}/cancel", other).status_code == 404
    listed = h.call("GET", "/v1/batches", key).get_json()["data"]
    assert [x["id"] for x in listed] == [b["id"]]


def test_bad_lines_reject_the_whole_batch_with_their_line_numbers(h):
    acct, key = h.account()
    jobs = lines(6)
    jobs[1]["input"]["width"] = 100_000  # past the model's limit…
    jobs[1]["input"]["steps"] = 10_000  # …and a second error on the same line
    jobs[3]["model"] = "no-such-model"
    jobs[4]["custom_id"] = jobs[0]["custom_id"]  # a duplicate
    jobs[5]["priority"] = "high"  # a batch-level field on a line
    resp = h.call("POST", "/v1/batches", key, json={"jobs": jobs})
    assert resp.status_code == 422
    body = resp.get_json()
    by_line: dict[int, list] = {}
    for e in body["errors"]:
        by_line.setdefault(e["line"], []).append(e)
    assert sorted(by_line) == [2, 4, 5, 6], body
    assert [e["loc"] for e in by_line[2]] == [["jobs", 1, "input", "width"], ["jobs", 1, "input", "steps"]]
    assert all("limit" in e["msg"] for e in by_line[2])
    [e4], [e5], [e6] = by_line[4], by_line[5], by_line[6]
    assert e4["loc"] == ["jobs", 3, "model"] and "no-such-model" in e4["msg"]
    assert e5["loc"] == ["jobs", 4, "custom_id"] and "line 1" in e5["msg"]
    assert e6["loc"] == ["jobs", 5, "priority"]
    assert "4 of 6 lines are invalid (lines 2, 4, 5, 6)" in body["detail"]
    assert count(h, Job) == 0 and count(h, Batch) == 0 and messages(h) == 0
    assert h.usage(key)["used_today"] == 0

    too_many = h.call("POST", "/v1/batches", key, json={"jobs": [{}] * (MAX_JOBS + 1)})
    assert too_many.status_code == 422
    assert too_many.get_json()["errors"][0]["loc"] == ["jobs"] and "10000" in too_many.get_json()["errors"][0]["msg"]
    both = h.call("POST", "/v1/batches", key, json={"jobs": lines(1), "input_file": "file_x"})
    assert both.status_code == 422 and both.get_json()["errors"][0]["loc"] == ["jobs"]


def test_a_jsonl_input_file_is_checked_line_by_line(h):
    acct, key = h.account()
    good = "\n".join(json.dumps(x) for x in lines(3)) + "\n\n"
    bad = good + '{"custom_id": "x", "model": "tiny-flux"\n'  # line 5: broken JSON
    files = {}
    for name, text in (("good", good), ("bad", bad)):
        up = h.call(
            "POST",
            "/v1/files",
            key,
            data={"purpose": "batch", "file": (__import__("io").BytesIO(text.encode()), f"{name}.jsonl")},
        )
        if name == "bad":  # the upload already refuses unparsable lines
            assert up.status_code == 422 and "line 5" in up.get_json()["detail"]
            continue
        assert up.status_code == 201, up.get_json()
        files[name] = up.get_json()["id"]
    missing_input = "\n".join(json.dumps(x) for x in lines(2)) + '\n{"custom_id": "y", "model": "tiny-flux"}\n'
    up = h.call(
        "POST",
        "/v1/files",
        key,
        data={"purpose": "batch", "file": (__import__("io").BytesIO(missing_input.encode()), "m.jsonl")},
    )
    resp = h.call("POST", "/v1/batches", key, json={"input_file": up.get_json()["id"]})
    assert resp.status_code == 422
    err = resp.get_json()["errors"][0]
    assert err["line"] == 3 and err["loc"] == ["input_file", "line", 3, "input"]

    ok = h.call("POST", "/v1/batches", key, json={"input_file": files["good"], "priority": "normal"})
    assert ok.status_code == 202 and ok.get_json()["counts"]["total"] == 3 and ok.get_json()["priority"] == "normal"
    assert messages(h, priority="normal") == 3
    other = h.account("b")[1]
    stolen = h.call("POST", "/v1/batches", other, json={"input_file": files["good"]})
    assert stolen.status_code == 422 and "no file" in stolen.get_json()["errors"][0]["msg"]


def test_a_batch_is_all_or_nothing(h, monkeypatch):
    acct, key = h.account()
    # Not enough tokens for the whole batch: 402, nothing written.
    short = h.call("POST", "/v1/batches", key, json={"jobs": lines(51)})  # 5,100 > 5,000 a day
    assert short.status_code == 402 and short.get_json()["shortfall"] == 100
    # The broker fails on the second model's messages: 503, and the first model's
    # messages name a batch that never committed.
    real = creation.publish
    calls = []

    def flaky(app, hint, model, priority, count=1):
        calls.append(model)
        if len(calls) == 2:
            raise ConnectionError("broker went away")
        return real(app, hint, model, priority, count=count)

    monkeypatch.setattr(creation, "publish", flaky)
    mixed = lines(3) + [
        {"custom_id": f"text-{i}", "model": "tiny-qwen2", "input": {"prompt": "hi", "max_tokens": 4}} for i in range(2)
    ]
    resp = h.call("POST", "/v1/batches", key, json={"jobs": mixed})
    assert resp.status_code == 503 and len(calls) == 2
    assert count(h, Job) == 0 and count(h, Batch) == 0 and count(h, LedgerEntry) == 0
    assert h.usage(key)["used_today"] == 0

    monkeypatch.setattr(creation, "publish", real)
    replay = {"Idempotency-Key": "render-42"}
    first = h.call("POST", "/v1/batches", key, json={"jobs": lines(4)}, headers=dict(replay))
    again = h.call("POST", "/v1/batches", key, json={"jobs": lines(4)}, headers=dict(replay))
    assert first.status_code == 202 and again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]
    assert count(h, Job) == 4
    changed = h.call("POST", "/v1/batches", key, json={"jobs": lines(5)}, headers=dict(replay))
    assert changed.status_code == 409


# --- cancel and the manifest ------------------------------------------------------------


def test_cancel_refunds_queued_jobs_stops_running_ones_and_the_manifest_lists_each_once(h):
    acct, key = h.account()
    b = h.call(
        "POST",
        "/v1/batches",
        key,
        json={
            "jobs": lines(20),
            "webhook": {"url": "http://127.0.0.1:9/hook", "events": ["batch.completed", "job.canceled"]},
        },
    ).get_json()
    with writing(h.services.sessions) as s:
        running = [fairness.take_next(s, "tiny-flux", "low", "w1", 30) for _ in range(2)]
    assert h.call("GET", f"/v1/batches/{b['id']}", key).get_json()["status"] == "running"
    resp = h.call("POST", f"/v1/batches/{b['id']}/cancel", key)
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["status"] == "canceled" and body["canceled"] == {"queued": 18, "running": 2}
    assert body["counts"]["canceled"] == 20 and body["counts"]["queued"] == 0
    assert h.call("POST", f"/v1/batches/{b['id']}/cancel", key).status_code == 409
    with h.services.sessions() as s:
        entries = s.execute(
            select(LedgerEntry.entry, func.count()).where(LedgerEntry.caller == acct).group_by(LedgerEntry.entry)
        ).all()
        assert dict(entries) == {"reserve": 20, "refund": 18, "settle": 2}
        assert ledger.audit(s, acct, ledger.day_of(h.now)) == (200, 0)  # two minimum charges
        charged = dict(s.execute(select(Job.id, Job.tokens_charged).where(Job.batch_id == b["id"])).all())
        assert {charged[j] for j in running} == {100} and sum(charged.values()) == 200
        job_hooks = s.execute(
            select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.event == "job.canceled")
        ).scalar_one()
        assert job_hooks == 20
    assert h.usage(key)["used_today"] == 200

    assert finish(h) == 1 and finish(h) == 0  # once
    done = h.call("GET", f"/v1/batches/{b['id']}", key).get_json()
    assert done["status"] == "canceled" and done["finished_at"] and done["results_url"]
    manifest = [json.loads(x) for x in h.http.get(done["results_url"]).get_data(as_text=True).splitlines()]
    assert len(manifest) == 20 and len({m["job_id"] for m in manifest}) == 20
    assert [m["custom_id"] for m in manifest] == [f"frame-{i:05d}" for i in range(20)]
    assert {m["status"] for m in manifest} == {"canceled"}
    with h.services.sessions() as s:
        hook = s.execute(select(WebhookDelivery).where(WebhookDelivery.event == "batch.completed")).scalar_one()
    payload = json.loads(hook.payload)
    assert hook.batch_id == b["id"] and payload["data"]["status"] == "canceled"
    assert payload["data"]["results_url"] and payload["data"]["counts"]["canceled"] == 20
    listed = h.call("GET", f"/v1/batches/{b['id']}/deliveries", key).get_json()["data"]
    assert [d["event"] for d in listed] == ["batch.completed"]


def test_the_manifest_has_outputs_as_signed_links_and_errors(h):
    acct, key = h.account()
    b = h.call("POST", "/v1/batches", key, json={"jobs": lines(4)}).get_json()
    services = h.services
    for i in range(4):
        with writing(services.sessions) as s:
            job_id = fairness.take_next(s, "tiny-flux", "low", "w1", 30)
        with services.sessions.begin() as s:
            if i % 2 == 0:
                services.store.put(f"jobs/{job_id}/1/image.png", b"png-bytes-%d" % i, "image/png")
                lifecycle.succeed(
                    s,
                    job_id,
                    "w1",
                    {"images": [{"url": {"$object": f"jobs/{job_id}/1/image.png"}}]},
                    0.5,
                    {},
                    h.now + timedelta(hours=24),
                )
            else:
                lifecycle.fail(s, job_id, "w1", "internal_error", "boom")
        if i < 3:
            assert finish(h) == 0  # not before every job has ended
    assert finish(h) == 1
    done = h.call("GET", f"/v1/batches/{b['id']}", key).get_json()
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 2 and done["counts"]["failed"] == 2
    manifest = [json.loads(x) for x in h.http.get(done["results_url"]).get_data(as_text=True).splitlines()]
    assert [m["custom_id"] for m in manifest] == [f"frame-{i:05d}" for i in range(4)]
    by_status = {m["custom_id"]: m for m in manifest}
    link = by_status["frame-00000"]["output"]["images"][0]["url"]
    assert h.http.get(link).data == b"png-bytes-0"
    assert by_status["frame-00001"]["error"] == {"code": "internal_error", "message": "boom"}
    assert by_status["frame-00001"]["output"] is None


def test_manifest_links_last_whole_seconds_when_the_retention_is_set_in_the_environment(make_settings):
    # VRAMQ_RETENTION_HOURS is read as a float: the manifest's link lifetime (the
    # retention, in seconds) must still reach the store as an int.
    settings, _ = make_settings(retention_hours=1.5)
    assert isinstance(settings.retention_hours, float)
    h = Harness(services_for(settings))
    acct, key = h.account()
    b = h.call("POST", "/v1/batches", key, json={"jobs": lines(1)}).get_json()
    services = h.services
    with writing(services.sessions) as s:
        job_id = fairness.take_next(s, "tiny-flux", "low", "w1", 30)
    services.store.put(f"jobs/{job_id}/1/image.png", b"png-bytes", "image/png")
    with services.sessions.begin() as s:
        lifecycle.succeed(
            s,
            job_id,
            "w1",
            {"images": [{"url": {"$object": f"jobs/{job_id}/1/image.png"}}]},
            0.5,
            {},
            h.now + timedelta(hours=1),
        )
    assert finish(h) == 1
    done = h.call("GET", f"/v1/batches/{b['id']}", key).get_json()
    manifest = [json.loads(x) for x in h.http.get(done["results_url"]).get_data(as_text=True).splitlines()]
    assert h.http.get(manifest[0]["output"]["images"][0]["url"]).data == b"png-bytes"


def test_batch_events_stream_counts_then_done(h):
    acct, key = h.account()
    b = h.call("POST", "/v1/batches", key, json={"jobs": lines(3)}).get_json()
    resp = h.call("GET", f"/v1/batches/{b['id']}/events", key)
    first = next(resp.response).decode()
    resp.close()
    assert first.startswith("event: counts") and '"queued": 3' in first
    h.call("POST", f"/v1/batches/{b['id']}/cancel", key)
    finish(h)
    frames = h.call("GET", f"/v1/batches/{b['id']}/events", key).get_data(as_text=True)
    assert frames.startswith("event: done") and '"status": "canceled"' in frames and "results_url" in frames


# --- fairness ---------------------------------------------------------------------------


def test_a_waiting_account_is_served_before_a_busy_one_and_busy_ones_alternate(h):
    a, key_a = h.account("a")
    b, key_b = h.account("b")
    h.call("POST", "/v1/batches", key_a, json={"jobs": lines(50)})
    services = h.services
    with writing(services.sessions) as s:
        for _ in range(3):
            fairness.take_next(s, "tiny-flux", "low", "w1", 30)
    h.now += timedelta(seconds=1)
    single = {"model": "tiny-flux", "input": INPUT, "priority": "low"}
    b_job = h.call("POST", "/v1/jobs", key_b, json=single).get_json()
    b_job = h.call("GET", f"/v1/jobs/{b_job['id']}", key_b).get_json()
    assert b_job["queue_position"] == 1  # behind at most one of A's 47, not all of them
    with writing(services.sessions) as s:
        assert fairness.take_next(s, "tiny-flux", "low", "w1", 30) == b_job["id"]
    for _ in range(4):
        h.call("POST", "/v1/jobs", key_b, json=single)
    owners = []
    with writing(services.sessions) as s:
        for _ in range(6):
            owners.append(s.get(Job, fairness.take_next(s, "tiny-flux", "low", "w1", 30)).caller)
    # In flight A 3, B 1: B's turns until they are even, then the older queue (A's) on a
    # tie, then alternating.
    assert owners == [b, b, a, b, a, b]


def test_priorities_come_before_fairness(h):
    _, key = h.account()
    h.call("POST", "/v1/batches", key, json={"jobs": lines(5)})
    high = h.call("POST", "/v1/jobs", key, json={"model": "tiny-flux", "input": INPUT, "priority": "high"}).get_json()
    assert h.call("GET", f"/v1/jobs/{high['id']}", key).get_json()["queue_position"] == 0
    assert messages(h, priority="high") == 1 and messages(h, priority="low") == 5
    with writing(h.services.sessions) as s:  # a low turn never takes the high job: its own turn does
        taken = fairness.take_next(s, "tiny-flux", "low", "w1", 30)
        assert s.get(Job, taken).priority == "low"
        assert fairness.take_next(s, "tiny-flux", "high", "w1", 30) == high["id"]
        assert fairness.take_next(s, "tiny-flux", "high", "w1", 30) is None


# --- real processes ---------------------------------------------------------------------


@pytest.mark.e2e
def test_one_accounts_2000_job_batch_does_not_starve_another_account(tmp_path, redis_url, models_dir, cluster_factory):
    """A's 2,000-job low batch is queued and running; B's normal job, then B's low job,
    start long before A's batch is half done. Then A cancels: the batch finishes with a
    manifest listing all 2,000 jobs once."""
    cluster = cluster_factory(settings_env(tmp_path, redis_url=redis_url, models_dir=models_dir))
    cluster.start_api()
    cluster.start_worker(models="tiny-flux")
    cluster._spawn("dispatcher", ["webhooks-and-batches"])
    key_a = cluster.post("/v1/accounts", json={}).json()["api_key"]
    key_b = cluster.post("/v1/accounts", json={}).json()["api_key"]
    auth_a, auth_b = {"Authorization": f"Bearer {key_a}"}, {"Authorization": f"Bearer {key_b}"}
    batch = cluster.post("/v1/batches", json={"jobs": lines(2000)}, headers=auth_a).json()
    assert batch["counts"]["total"] == 2000, batch

    def a_counts() -> dict:
        return cluster.get(f"/v1/batches/{batch['id']}", headers=auth_a).json()["counts"]

    deadline = time.monotonic() + 120
    while a_counts()["succeeded"] < 20:  # A's batch is well under way
        assert time.monotonic() < deadline, a_counts()
        time.sleep(0.2)
    started = {}
    for priority in ("normal", "low"):
        job = cluster.post(
            "/v1/jobs", json={"model": "tiny-flux", "input": INPUT, "priority": priority}, headers=auth_b
        ).json()
        while True:
            got = cluster.get(f"/v1/jobs/{job['id']}", headers=auth_b).json()
            if got["started_at"]:
                break
            time.sleep(0.02)
        c = a_counts()
        started[priority] = c["succeeded"] + c["failed"] + c["running"]
    print(f"A's jobs started or done when B's started: {started}")
    assert started["normal"] < 1000 and started["low"] < 1000, started
    # Same priority: B waited for at most a few of A's turns (what was running or already
    # fetched by the worker's threads), not for A's queue.
    assert started["low"] - started["normal"] < 100, started

    canceled = cluster.post(f"/v1/batches/{batch['id']}/cancel", headers=auth_a).json()
    assert canceled["status"] == "canceled" and canceled["canceled"]["queued"] > 0
    deadline = time.monotonic() + 60
    while not (b := cluster.get(f"/v1/batches/{batch['id']}", headers=auth_a).json())["results_url"]:
        assert time.monotonic() < deadline, b
        time.sleep(0.2)
    assert b["counts"]["queued"] == b["counts"]["running"] == 0 and b["counts"]["total"] == 2000
    manifest = [json.loads(x) for x in requests.get(b["results_url"], timeout=30).text.splitlines()]
    assert len(manifest) == 2000 and len({m["job_id"] for m in manifest}) == 2000
    assert sorted(m["custom_id"] for m in manifest) == [f"frame-{i:05d}" for i in range(2000)]
    done = [m for m in manifest if m["status"] == "succeeded"]
    assert done and all(m["output"]["images"][0]["url"] for m in done)
    image = requests.get(done[0]["output"]["images"][0]["url"], timeout=10)
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"


@pytest.mark.e2e
def test_the_client_submits_follows_and_collects_a_batch(shared_cluster):
    from vramq.api.client import Client

    shared_cluster.ensure_dispatcher()  # the dispatcher finishes batches
    key = Client(shared_cluster.url).create_account("client")["api_key"]
    client = Client(shared_cluster.url, api_key=key)
    b = client.submit_batch(lines(4), priority="normal", metadata={"shot": 7})
    assert [j["custom_id"] for j in client.batch_jobs(b["id"], page_size=3)] == [f"frame-{i:05d}" for i in range(4)]
    updates = []
    done = client.wait_batch(b["id"], timeout=180, on_update=updates.append)
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 4 and done["metadata"] == {"shot": 7}
    assert updates and updates[-1]["results_url"] == done["results_url"]
    results = client.batch_results(done)
    assert [r["custom_id"] for r in results] == [f"frame-{i:05d}" for i in range(4)]
    assert client.download(results[2]["output"]["images"][0]["url"])[:4] == b"\x89PNG"
    assert done["usage"]["tokens_charged"] >= 4 * 100
