"""One place where a job's run ends (``jobs.outcomes.end``), on PostgreSQL and SQLite:
the attempt cap and its dead letters, give-back, and that every end writes its ledger
row, its webhook and its events together."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from tests.fixtures.http import IMAGE
from vramq.jobs import events, fairness, ledger, outcomes
from vramq.jobs.db import writing
from vramq.jobs.lifecycle import utcnow
from vramq.jobs.schema import Job, LedgerEntry, WebhookDelivery
from vramq.jobs.webhooks.outbox import job_json_for

ADMIN = "admin-key-for-tests"


def take(h, worker: str, now) -> str | None:
    with writing(h.services.sessions) as s:
        return fairness.take_next(s, "tiny-flux", "normal", worker, 30, now)


def lapse(h, now, max_attempts: int = 3) -> outcomes.Ending:
    with h.services.sessions.begin() as s:
        ending = outcomes.end(
            s,
            outcomes.LeaseLapsed(max_attempts),
            allowances=h.services.allowances,
            job_json=job_json_for(h.services),
            now=now,
        )
    ending.announce(h.services.redis)
    return ending


def job_row(h, job_id: str) -> Job:
    with h.services.sessions() as s:
        return s.get(Job, job_id)


def test_a_job_that_kills_its_worker_three_times_fails_worker_lost_and_is_refunded(harness):
    h = harness(webhook_allow_hosts="127.0.0.1", admin_key=ADMIN, free_daily_tokens="5000")
    account, key = h.account()
    resp = h.submit(key, {**IMAGE, "webhook": {"url": "http://127.0.0.1:9/hook"}})
    assert resp.status_code == 202, resp.get_json()
    job_id = resp.get_json()["id"]
    now = utcnow()
    for attempt in (1, 2):
        assert take(h, f"w{attempt}", now) == job_id
        now += timedelta(seconds=31)  # the worker died: its lease lapses
        ending = lapse(h, now)
        assert ending.turns == [(job_id, "tiny-flux", "normal")]  # queued again, with a new turn
        row = job_row(h, job_id)
        assert row.status == "queued" and row.attempts == attempt
    assert take(h, "w3", now) == job_id
    now += timedelta(seconds=31)
    ending = lapse(h, now)
    assert ending.turns == [] and ending.ids("failed") == [job_id]

    row = job_row(h, job_id)
    assert (row.status, row.error_code, row.attempts) == ("failed", "worker_lost", 3)
    assert "3 times" in row.error_message and row.finished_at is not None
    assert row.tokens_reserved == 100 and row.tokens_charged == 0
    with h.services.sessions() as s:
        entries = [
            e.entry
            for e in s.execute(
                select(LedgerEntry).where(LedgerEntry.job_id == job_id).order_by(LedgerEntry.id)
            ).scalars()
        ]
        assert entries == ["reserve", "refund"]
        assert ledger.audit(s, account, ledger.day_of(h.now)) == (0, 0)
        hooks = list(s.execute(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)).scalars())
    assert [d.event for d in hooks] == ["job.failed"]
    assert '"worker_lost"' in hooks[0].payload
    stream = [(e, d) for _id, e, d in events.read(h.services.redis, job_id)]
    assert stream[-2:] == [("status", {"status": "failed"}), ("done", {"status": "failed"})]

    # A fourth lapse finds nothing: the failure happened once.
    assert not lapse(h, now + timedelta(seconds=60)).won
    # The operator's dead-letter view lists it; the account's key may not read it.
    page = h.call("GET", "/v1/admin/jobs?status=failed&code=worker_lost", ADMIN).get_json()
    assert [j["id"] for j in page["data"]] == [job_id]
    assert page["data"][0]["error"]["code"] == "worker_lost"
    assert h.call("GET", "/v1/admin/jobs?code=model_load_failed", ADMIN).get_json()["data"] == []
    assert h.call("GET", "/v1/admin/jobs", key).status_code == 403


def test_the_cap_is_a_setting_and_a_job_below_it_is_queued_again(harness):
    h = harness()
    job_id = h.submit().get_json()["id"]
    now = utcnow()
    for _ in range(5):
        assert take(h, "w", now) == job_id
        now += timedelta(seconds=31)
        lapse(h, now, max_attempts=6)
        assert job_row(h, job_id).status == "queued"
    assert h.services.settings.max_attempts == 3  # the default


def test_a_job_given_back_is_queued_at_once_and_the_attempt_is_not_counted(harness):
    h = harness()
    job_id = h.submit().get_json()["id"]
    assert take(h, "w1", utcnow()) == job_id
    with h.services.sessions.begin() as s:
        assert not outcomes.end(s, outcomes.GivenBack(), job_id=job_id, worker="someone-else").won
        ending = outcomes.end(s, outcomes.GivenBack(), job_id=job_id, worker="w1")
    assert ending.turns == [(job_id, "tiny-flux", "normal")]
    row = job_row(h, job_id)
    assert (row.status, row.attempts, row.lease_owner) == ("queued", 0, None)


def test_a_late_outcome_changes_nothing_and_writes_nothing(harness):
    """A worker whose lease lapsed (another worker has the job now) cannot record an end:
    no transition, no ledger row, no webhook, no events."""
    h = harness(webhook_allow_hosts="127.0.0.1")
    _account, key = h.account()
    job_id = h.submit(key, {**IMAGE, "webhook": {"url": "http://127.0.0.1:9/hook"}}).get_json()["id"]
    now = utcnow()
    take(h, "old", now)
    lapse(h, now + timedelta(seconds=31))
    take(h, "new", now + timedelta(seconds=31))
    with h.services.sessions.begin() as s:
        late = outcomes.end(
            s,
            outcomes.Succeeded({"x": 1}, 9.0, {}, None),
            job_id=job_id,
            worker="old",
            allowances=h.services.allowances,
            job_json=job_json_for(h.services),
        )
        failed = outcomes.end(
            s, outcomes.Failed("boom", "late"), job_id=job_id, worker="old", job_json=job_json_for(h.services)
        )
    assert not late.won and not failed.won and late.events == [] and failed.events == []
    with h.services.sessions() as s:
        assert [
            e.entry
            for e in s.execute(
                select(LedgerEntry).where(LedgerEntry.job_id == job_id).order_by(LedgerEntry.id)
            ).scalars()
        ] == ["reserve"]
        assert s.execute(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)).first() is None
    row = job_row(h, job_id)
    assert (row.status, row.lease_owner) == ("running", "new")


@pytest.mark.parametrize(
    "outcome", [outcomes.Succeeded({"text": "hi"}, 0.5, {}, None), outcomes.Failed("boom", "it broke")]
)
def test_every_end_settles_announces_and_writes_its_webhook_together(harness, outcome):
    h = harness(webhook_allow_hosts="127.0.0.1")
    account, key = h.account()
    job_id = h.submit(key, {**IMAGE, "webhook": {"url": "http://127.0.0.1:9/hook"}}).get_json()["id"]
    take(h, "w", utcnow())
    with h.services.sessions.begin() as s:
        ending = outcomes.end(
            s, outcome, job_id=job_id, worker="w", allowances=h.services.allowances, job_json=job_json_for(h.services)
        )
    ending.announce(h.services.redis)
    status = "succeeded" if isinstance(outcome, outcomes.Succeeded) else "failed"
    assert ending.ids(status) == [job_id]
    with h.services.sessions() as s:
        entries = [
            e.entry
            for e in s.execute(
                select(LedgerEntry).where(LedgerEntry.job_id == job_id).order_by(LedgerEntry.id)
            ).scalars()
        ]
        hooks = [d.event for d in s.execute(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)).scalars()]
    assert entries == ["reserve", "settle" if status == "succeeded" else "refund"]
    assert hooks == [f"job.{status}"]
    assert [e for _i, e, _d in events.read(h.services.redis, job_id)][-1] == "done"
    assert job_row(h, job_id).tokens_charged == (100 if status == "succeeded" else 0)
