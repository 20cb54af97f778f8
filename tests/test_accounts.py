"""Accounts, keys, the token ledger, history, rate limits.

The ledger tests run on real PostgreSQL and on SQLite; the HTTP tests use the real
Flask app on real Redis (in process, so the clock can be moved), and the concurrency
test a real API process over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import requests
from sqlalchemy import func, select

from tests.conftest import settings_env
from tests.fixtures.http import IMAGE
from tests.fixtures.services import services_for
from vramq.jobs import ledger, lifecycle
from vramq.jobs.schema import Account, Job, LedgerEntry
from vramq.jobs.services import Services

# --- accounts and keys --------------------------------------------------------------


def test_account_key_is_shown_once_and_stored_hashed(harness):
    h = harness()
    account_id, key = h.account("studio")
    assert account_id.startswith("acct_") and key.startswith("vq_") and len(key) > 40
    with h.services.sessions() as s:
        row = s.get(Account, account_id)
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest() and row.key_prefix == key[:11]
    assert key not in json.dumps({c.name: str(getattr(row, c.name)) for c in Account.__table__.columns})
    me = h.call("GET", "/v1/account", key).get_json()
    assert me["account_id"] == account_id and me["tier"] == "free" and "api_key" not in me
    # A wrong key is 401, never a silent fall-back to anonymous.
    bad = h.call("GET", "/v1/usage", "vq_" + "x" * 43)
    assert bad.status_code == 401 and bad.get_json()["code"] == "unauthorized" and "WWW-Authenticate" in bad.headers
    assert h.call("GET", "/v1/usage", headers={"Authorization": "Basic abc"}).status_code == 401
    extra = h.call("POST", "/v1/accounts", json={"name": "x", "tier": "pro"})
    assert extra.status_code == 422 and extra.get_json()["errors"][0]["loc"] == ["tier"]


def test_usage_reports_tier_allowance_and_reset(harness):
    h = harness(free_daily_tokens=5000, anonymous_daily_tokens=2500)
    _, key = h.account()
    assert h.usage() == {
        "tier": "anonymous",
        "daily_allowance": 2500,
        "used_today": 0,
        "balance": 0,
        "available": 2500,
        "resets_at": "2026-03-15T00:00:00Z",
    }
    assert h.usage(key)["tier"] == "free" and h.usage(key)["daily_allowance"] == 5000


# --- allowances, reservation, 402 ---------------------------------------------------


def test_reservation_and_402_with_resets_at_and_shortfall(harness):
    h = harness(anonymous_daily_tokens=250)
    first = h.submit()
    assert first.status_code == 202
    job = first.get_json()
    assert job["usage"]["tokens_reserved"] == 100 and job["usage"]["tokens_charged"] == 0
    assert h.submit().status_code == 202
    refused = h.submit()
    assert refused.status_code == 402, refused.get_json()
    p = refused.get_json()
    assert p["code"] == "quota_exceeded" and p["resets_at"] == "2026-03-15T00:00:00Z"
    assert p["tokens_needed"] == 100 and p["tokens_available"] == 50 and p["shortfall"] == 50
    assert "resets at 2026-03-15T00:00:00Z" in p["detail"]
    with h.services.sessions() as s:
        assert s.execute(select(func.count()).select_from(Job)).scalar_one() == 2  # nothing written for the 402
    assert h.usage()["used_today"] == 200


def test_allowance_resets_at_the_utc_day_boundary(harness):
    h = harness(anonymous_daily_tokens=200)
    h.now = datetime(2026, 3, 14, 23, 59, 58, tzinfo=UTC)
    assert [h.submit().status_code for _ in range(3)] == [202, 202, 402]
    h.now = datetime(2026, 3, 14, 23, 59, 59, 999000, tzinfo=UTC)
    assert h.submit().status_code == 402
    h.now = datetime(2026, 3, 15, 0, 0, 0, tzinfo=UTC)
    assert h.usage() == {
        "tier": "anonymous",
        "daily_allowance": 200,
        "used_today": 0,
        "balance": 0,
        "available": 200,
        "resets_at": "2026-03-16T00:00:00Z",
    }
    assert [h.submit().status_code for _ in range(3)] == [202, 202, 402]
    # Each day's reservations sit on that day in the ledger.
    days = [r.day for r in h.ledger_rows("anon:127.0.0.1")]
    assert days == ["2026-03-14", "2026-03-14", "2026-03-15", "2026-03-15"]


def test_credit_then_spend_allowance_first_then_balance(harness):
    h = harness(free_daily_tokens=200, admin_key="admin-secret")
    account_id, key = h.account()
    credit = {"tokens": 300, "reason": "pack #1"}
    path = f"/v1/admin/accounts/{account_id}/credit"
    # Only the admin key may credit: anonymous 401, an account's key 403.
    assert h.call("POST", path, json=credit).status_code == 401
    assert h.call("POST", path, key, json=credit).status_code == 403
    first = h.call("POST", path, "admin-secret", json=credit, headers={"Idempotency-Key": "order-1"})
    assert first.status_code == 201 and first.get_json()["balance"] == 300
    again = h.call("POST", path, "admin-secret", json=credit, headers={"Idempotency-Key": "order-1"})
    assert again.status_code == 200 and again.get_json() == {"account_id": account_id, "balance": 300, "replayed": True}
    assert (
        h.call("POST", path, "admin-secret", json={"tokens": 5}, headers={"Idempotency-Key": "order-1"}).status_code
        == 409
    )
    bad = h.call("POST", path, "admin-secret", json={"tokens": 0})
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["loc"] == ["tokens"]
    assert h.call("POST", "/v1/admin/accounts/acct_nope/credit", "admin-secret", json=credit).status_code == 404

    codes = [h.submit(key).status_code for _ in range(6)]
    assert codes == [202] * 5 + [402]
    use = h.usage(key)
    assert use["used_today"] == 200 and use["balance"] == 0 and use["available"] == 0
    reserves = [(r.allowance_delta, r.balance_delta) for r in h.ledger_rows(account_id) if r.entry == "reserve"]
    assert reserves == [(-100, 0), (-100, 0), (0, -100), (0, -100), (0, -100)]
    # The next day the allowance is back; the spent balance is not.
    h.now += timedelta(days=1)
    assert h.usage(key) == {**use, "used_today": 0, "available": 200, "resets_at": "2026-03-16T00:00:00Z"}
    shown = h.call("GET", f"/v1/admin/accounts/{account_id}", "admin-secret").get_json()
    assert [e["entry"] for e in shown["ledger"]][-1] == "credit" and shown["usage"]["balance"] == 0


def test_admin_api_is_off_without_an_admin_key(harness):
    h = harness()
    account_id, key = h.account()
    resp = h.call("POST", f"/v1/admin/accounts/{account_id}/credit", key, json={"tokens": 1})
    assert resp.status_code == 403 and "VRAMQ_ADMIN_KEY" in resp.get_json()["detail"]


# --- settlement and refunds (ledger level: exact amounts) ---------------------------


def _reserved_job(
    services: Services, caller: str, tokens: int, *, rate: float = 100.0, min_tokens: int = 10, now: datetime
) -> Job:
    """A job row with its reservation, as ``submit_job`` writes them."""
    from vramq.jobs.ids import new_id

    job = Job(
        id=new_id("job"),
        model="tiny-flux",
        kind="image",
        status="running",
        priority="normal",
        input={},
        meta={},
        progress=0.0,
        created_at=now,
        attempts=1,
        gpu_seconds=0.0,
        tokens_reserved=tokens,
        tokens_charged=0,
        usage_detail={},
        caller=caller,
        saved=False,
        work_units=1.0,
        price_rate=rate,
        min_tokens=min_tokens,
    )
    with services.sessions.begin() as s:
        ledger.reserve(s, caller, services.allowances.for_caller(s, caller), job.id, tokens, now)
        s.add(job)
    return job


def _totals(services: Services, caller: str, now: datetime) -> tuple[int, int]:
    """``(used today, balance)``: the wallet's running totals, checked against the ledger's sums."""
    with services.sessions() as s:
        use = ledger.usage(s, caller, "anonymous", services.allowances, now)
        assert ledger.audit(s, caller, ledger.day_of(now)) == (use.used_today, use.balance)
        return use.used_today, use.balance


def test_settlement_below_and_above_the_reservation(db_services):
    services = db_services(anonymous_daily_tokens=1000)
    now = datetime(2026, 5, 1, 9, tzinfo=UTC)
    caller = "anon:10.0.0.1"

    # Below: 500 reserved, 2.0 GPU-s at 100 tokens/s costs 200: 300 come back.
    below = _reserved_job(services, caller, 500, now=now)
    assert _totals(services, caller, now) == (500, 0)
    with services.sessions.begin() as s:
        result = ledger.settle(s, below, 2.0, services.allowances, now)
    assert (result.reserved, result.cost, result.charged, result.written_off) == (500, 200, 200, 0)
    assert _totals(services, caller, now) == (200, 0)
    with services.sessions.begin() as s:
        assert ledger.settle(s, below, 9.0, services.allowances, now) is None  # settled once only
        assert s.get(Job, below.id).tokens_charged == 200
    assert _totals(services, caller, now) == (200, 0)

    # Above: 100 reserved, 4.001 GPU-s costs ceil(400.1) = 401: the 301 over come from what is left.
    above = _reserved_job(services, caller, 100, now=now)
    with services.sessions.begin() as s:
        result = ledger.settle(s, above, 4.001, services.allowances, now)
    assert (result.cost, result.charged, result.written_off) == (401, 401, 0)
    assert _totals(services, caller, now) == (601, 0)

    # Above, past everything left (399 of the allowance): the caller ends at zero, never
    # below; what could not be covered is written off and said so.
    third = _reserved_job(services, caller, 100, now=now)
    with services.sessions.begin() as s:
        result = ledger.settle(s, third, 10.0, services.allowances, now)
    assert (result.cost, result.charged, result.written_off) == (1000, 100 + 299, 601)
    assert _totals(services, caller, now) == (1000, 0)
    with services.sessions() as s:
        reason = s.execute(
            select(LedgerEntry.reason).where(LedgerEntry.job_id == third.id, LedgerEntry.entry == "settle")
        ).scalar_one()
    assert reason == "cost 1000 over reservation 100; 601 written off"

    # The minimum applies however short the job.
    with services.sessions.begin() as s:
        ledger.refund(s, third.id, now, "no-op: already settled")  # closed jobs are not refunded
    tiny = _reserved_job(services, "anon:10.0.0.2", 50, min_tokens=30, now=now)
    with services.sessions.begin() as s:
        assert ledger.settle(s, tiny, 0.001, services.allowances, now).charged == 30
    assert _totals(services, caller, now) == (1000, 0)


def test_settlement_gives_back_to_the_balance_first(db_services):
    services = db_services(free_daily_tokens=100)
    now = datetime(2026, 5, 1, 9, tzinfo=UTC)
    with services.sessions.begin() as s:
        from vramq.jobs.accounts import create_account

        account, _key = create_account(s)
        ledger.credit(s, account.id, 1000, "pack", now)
    job = _reserved_job(services, account.id, 500, now=now)  # 100 from the allowance, 400 from the balance
    assert _totals(services, account.id, now) == (100, 600)
    with services.sessions.begin() as s:
        ledger.settle(s, job, 3.0, services.allowances, now)  # costs 300: 200 back, to the balance
    assert _totals(services, account.id, now) == (100, 800)


def test_refund_on_cancel_before_start_and_minimum_when_running(harness):
    h = harness(anonymous_daily_tokens=1000)
    queued = h.submit().get_json()
    running = h.submit().get_json()
    assert h.usage()["used_today"] == 200
    with h.services.sessions.begin() as s:
        assert lifecycle.take(s, running["id"], "w1", 30)
    assert h.call("POST", f"/v1/jobs/{queued['id']}/cancel").get_json()["usage"]["tokens_charged"] == 0
    assert h.usage()["used_today"] == 100
    # A job canceled while it ran is charged its model's minimum (it held a slot).
    canceled = h.call("POST", f"/v1/jobs/{running['id']}/cancel").get_json()
    assert canceled["status"] == "canceled" and canceled["usage"]["tokens_charged"] == 100
    assert h.usage()["used_today"] == 100
    entries = [(r.entry, r.job_id) for r in h.ledger_rows("anon:127.0.0.1")]
    assert entries == [
        ("reserve", queued["id"]),
        ("reserve", running["id"]),
        ("refund", queued["id"]),
        ("settle", running["id"]),
    ]


def test_worker_settles_a_finished_job_at_its_measured_cost(shared_cluster):
    """Through a real worker: the charge is max(min_tokens, ceil(GPU-seconds x rate))."""
    model = shared_cluster.get("/v1/models/tiny-flux").json()
    job = shared_cluster.wait_job(shared_cluster.post("/v1/jobs", json=IMAGE).json()["id"])
    assert job["status"] == "succeeded"
    use = job["usage"]
    rate, floor = model["price"]["tokens_per_gpu_second"], model["price"]["min_tokens"]
    assert use["gpu_seconds"] > 0 and use["tokens_reserved"] >= floor
    assert use["tokens_charged"] == max(floor, math.ceil(round(use["gpu_seconds"] * rate, 6)))


# --- concurrency: exact under 100 simultaneous submits ------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("db", ["postgresql", "sqlite"])
def test_100_concurrent_submits_against_an_allowance_for_10(
    db, tmp_path, redis_url, models_dir, cluster_factory, request
):
    extra = {"database_url": request.getfixturevalue("pg_url")} if db == "postgresql" else {}
    env = settings_env(tmp_path, redis_url=redis_url, models_dir=models_dir, free_daily_tokens=1000, **extra)
    cluster = cluster_factory(env)
    cluster.start_api(workers=2)
    cluster.announce_loading_worker(["tiny-flux"])
    key = cluster.post("/v1/accounts", json={}).json()["api_key"]
    auth = {"Authorization": f"Bearer {key}"}

    def submit(i: int) -> requests.Response:
        return requests.post(cluster.url + "/v1/jobs", json={**IMAGE, "metadata": {"i": i}}, headers=auth, timeout=60)

    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(submit, range(100)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [202] * 10 + [402] * 90, codes
    assert {r.json()["code"] for r in answers if r.status_code == 402} == {"quota_exceeded"}
    use = cluster.get("/v1/usage", headers=auth).json()
    assert use["used_today"] == 1000 and use["available"] == 0 and use["balance"] == 0
    # The ledger balances to the token: 10 reservations of 100, one per accepted job.
    services = services_for(__import__("vramq.jobs.settings", fromlist=["Settings"]).Settings.from_env(env))
    with services.sessions() as s:
        rows = s.execute(select(LedgerEntry.job_id, LedgerEntry.allowance_delta, LedgerEntry.balance_delta)).all()
        job_ids = set(s.execute(select(Job.id)).scalars())
        caller = s.execute(select(LedgerEntry.caller).distinct()).scalar_one()
        assert ledger.audit(s, caller, ledger.day_of(datetime.now(UTC))) == (1000, 0)
    assert len(rows) == 10 and all(a == -100 and b == 0 for _j, a, b in rows)
    assert {j for j, _a, _b in rows} == job_ids == {r.json()["id"] for r in answers if r.status_code == 202}


# --- isolation and history ------------------------------------------------------------


def test_another_account_gets_404_on_every_verb(harness):
    h = harness()
    _, key_a = h.account("a")
    _, key_b = h.account("b")
    job = h.submit(key_a).get_json()
    jid = job["id"]
    verbs = [
        ("GET", f"/v1/jobs/{jid}"),
        ("POST", f"/v1/jobs/{jid}/cancel"),
        ("POST", f"/v1/jobs/{jid}/save"),
        ("DELETE", f"/v1/jobs/{jid}/save"),
        ("POST", f"/v1/jobs/{jid}/share"),
        ("DELETE", f"/v1/jobs/{jid}/share"),
        ("GET", f"/v1/jobs/{jid}/events"),
    ]
    for method, path in verbs:
        resp = h.call(method, path, key_b)
        assert resp.status_code == 404 and resp.get_json()["code"] == "not_found", (method, path, resp.status_code)
        anon = h.call(method, path)
        assert anon.status_code in (401, 404), (method, path, anon.status_code)  # save needs a key: 401 first
    assert h.call("GET", "/v1/jobs", key_b).get_json()["data"] == []
    # Still there, untouched, for its owner.
    mine = h.call("GET", f"/v1/jobs/{jid}", key_a).get_json()
    assert mine["status"] == "queued" and h.call("GET", "/v1/jobs", key_a).get_json()["data"][0]["id"] == jid


def test_history_newest_first_with_filters_and_a_stable_cursor(harness):
    h = harness()
    _, key = h.account()
    text = {"model": "tiny-qwen2", "input": {"prompt": "hi", "max_tokens": 4}}
    ids = []
    for i in range(5):
        h.now += timedelta(seconds=1)
        ids.append(h.submit(key, IMAGE if i % 2 == 0 else text).get_json()["id"])
    h.call("POST", f"/v1/jobs/{ids[0]}/cancel", key)

    page1 = h.call("GET", "/v1/jobs?limit=2", key).get_json()
    assert [j["id"] for j in page1["data"]] == [ids[4], ids[3]] and page1["next_cursor"]
    # New jobs arriving between pages neither shift nor repeat what follows.
    h.now += timedelta(seconds=1)
    newest = h.submit(key).get_json()["id"]
    page2 = h.call("GET", f"/v1/jobs?limit=2&cursor={page1['next_cursor']}", key).get_json()
    page3 = h.call("GET", f"/v1/jobs?limit=2&cursor={page2['next_cursor']}", key).get_json()
    assert [j["id"] for j in page2["data"]] == [ids[2], ids[1]]
    assert [j["id"] for j in page3["data"]] == [ids[0]] and page3["next_cursor"] is None
    assert h.call("GET", "/v1/jobs", key).get_json()["data"][0]["id"] == newest

    by_model = h.call("GET", "/v1/jobs?model=tiny-qwen2", key).get_json()["data"]
    assert [j["id"] for j in by_model] == [ids[3], ids[1]]
    canceled = h.call("GET", "/v1/jobs?status=canceled", key).get_json()["data"]
    assert [j["id"] for j in canceled] == [ids[0]]
    assert len(h.call("GET", "/v1/jobs?status=queued,canceled", key).get_json()["data"]) == 6

    anon = h.call("GET", "/v1/jobs")
    assert anon.status_code == 401 and anon.get_json()["code"] == "unauthorized"
    for query, field in [
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("status=done", "status"),
        ("cursor=@@", "cursor"),
    ]:
        resp = h.call("GET", f"/v1/jobs?{query}", key)
        assert resp.status_code == 422 and resp.get_json()["errors"][0]["loc"] == ["query", field], query


# --- rate limits ------------------------------------------------------------------------


def test_rate_limits_per_address_and_per_key(harness):
    h = harness(rate_limit_anonymous=5, rate_limit_keyed=8)
    _, key = h.account()  # 1 anonymous request
    assert [h.call("GET", "/v1/usage").status_code for _ in range(4)] == [200] * 4
    limited = h.call("GET", "/v1/usage")
    assert limited.status_code == 429 and limited.get_json()["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert h.call("GET", "/healthz").status_code == 200  # health checks are never limited
    # The key has a budget of its own.
    assert [h.call("GET", "/v1/usage", key).status_code for _ in range(9)] == [200] * 8 + [429]


# --- pricing ------------------------------------------------------------------------------


def test_estimate_is_calibrated_from_recent_runs(make_settings):
    from vramq.jobs.catalog import ModelEntry
    from vramq.jobs.ids import new_id
    from vramq.jobs.pricing import PRIOR_SECONDS_PER_UNIT, Estimator, rate_for

    settings, _ = make_settings()
    services = services_for(settings)
    entry = services.catalog.get("tiny-flux")
    est = Estimator(services.sessions)
    assert est.calibrate(entry) == PRIOR_SECONDS_PER_UNIT["image"]  # no history yet
    now = datetime.now(UTC)
    with services.sessions.begin() as s:
        for k in range(10):  # GPU-seconds per unit 0.5, 1.0, ..., 5.0
            s.add(
                Job(
                    id=new_id("job"),
                    model="tiny-flux",
                    kind="image",
                    status="succeeded",
                    priority="normal",
                    input={},
                    meta={},
                    progress=1.0,
                    created_at=now,
                    finished_at=now,
                    attempts=1,
                    gpu_seconds=(k + 1) * 1.0,
                    tokens_reserved=0,
                    tokens_charged=0,
                    usage_detail={},
                    saved=False,
                    work_units=2.0,
                )
            )
    assert est.calibrate(entry) == 4.5  # the 90th percentile of the ten ratios
    quote = est.quote(entry, 3.0)
    assert quote.tokens == math.ceil(3.0 * 4.5 * 200) and quote.rate == 200

    # Without a price in the catalog, the rate follows the model's VRAM need.
    free = ModelEntry.model_validate({**entry.model_dump(), "id": "tiny-flux-unpriced", "price": {}})
    from vramq.jobs.pricing import RATE_PER_GB, vram_need_bytes

    need = vram_need_bytes(free)
    assert need and rate_for(free) == max(1.0, round(RATE_PER_GB * need / 1e9, 2))


@pytest.mark.e2e
def test_accounts_cli_create_credit_show(make_settings):
    import os
    import subprocess
    import sys

    _settings, env = make_settings(free_daily_tokens=5000)
    env = {**os.environ, **env}

    def vramq(*args: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "vramq.api.cli", "accounts", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    made = vramq("create", "--name", "ops")
    assert made["account_id"].startswith("acct_") and made["api_key"].startswith("vq_")
    credited = vramq("credit", made["account_id"], "200000", "--reason", "pack: 200,000 tokens")
    assert credited["usage"]["balance"] == 200000 and credited["ledger"][0]["reason"] == "pack: 200,000 tokens"
    shown = vramq("show", made["account_id"])
    assert shown["usage"]["daily_allowance"] == 5000 and shown["key_prefix"] == made["api_key"][:11]
    missing = subprocess.run(
        [sys.executable, "-m", "vramq.api.cli", "accounts", "show", "acct_nope"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "no account acct_nope" in missing.stderr
