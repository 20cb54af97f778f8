"""The job state machine on SQLite and PostgreSQL: every transition has exactly one winner."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from vramq.jobs import lifecycle as lc
from vramq.jobs.db import make_engine, make_sessionmaker, migrate
from vramq.jobs.errors import Conflict, NotFound
from vramq.jobs.ids import new_id
from vramq.jobs.schema import Job


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    engine = make_engine(url)
    migrate(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def add_job(sessions, **kw) -> str:
    job_id = new_id("job")
    with sessions.begin() as s:
        s.add(
            Job(
                id=job_id,
                model="m",
                kind="image",
                status=lc.QUEUED,
                priority="normal",
                input={},
                meta={},
                progress=0.0,
                created_at=lc.utcnow(),
                attempts=0,
                gpu_seconds=0.0,
                tokens_reserved=0,
                tokens_charged=0,
                usage_detail={},
                saved=False,
                **kw,
            )
        )
    return job_id


def read(sessions, job_id) -> Job:
    with sessions() as s:
        return s.get(Job, job_id)


def test_happy_path(sessions):
    job_id = add_job(sessions)
    with sessions.begin() as s:
        assert lc.take(s, job_id, "w1", 30)
    with sessions.begin() as s:
        lc.record_progress(s, "w1", {job_id: 0.5})
    assert read(sessions, job_id).progress == 0.5
    with sessions.begin() as s:
        assert lc.succeed(s, job_id, "w1", {"x": 1}, 1.5, {"batch_size": 2}, None)
    job = read(sessions, job_id)
    assert (job.status, job.output, job.gpu_seconds, job.progress, job.attempts) == ("succeeded", {"x": 1}, 1.5, 1.0, 1)
    assert job.lease_owner is None and job.finished_at >= job.started_at >= job.created_at


def test_concurrent_takes_have_one_winner(sessions):
    job_id = add_job(sessions)
    wins, barrier = [], threading.Barrier(8)

    def racer(n):
        barrier.wait()
        with sessions.begin() as s:
            if lc.take(s, job_id, f"w{n}", 30):
                wins.append(n)

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(wins) == 1
    assert read(sessions, job_id).lease_owner == f"w{wins[0]}"


def test_finished_job_cannot_be_taken_or_finished_again(sessions):
    job_id = add_job(sessions)
    with sessions.begin() as s:
        lc.take(s, job_id, "w1", 30)
        lc.succeed(s, job_id, "w1", {}, 0, {}, None)
    with sessions.begin() as s:
        assert not lc.take(s, job_id, "w2", 30)
        assert not lc.succeed(s, job_id, "w1", {"again": True}, 0, {}, None)
        assert not lc.fail(s, job_id, "w1", "x", "y")
    assert read(sessions, job_id).output == {}


def test_only_the_lease_owner_records_the_outcome(sessions):
    job_id = add_job(sessions)
    with sessions.begin() as s:
        lc.take(s, job_id, "w1", 30)
    with sessions.begin() as s:
        assert not lc.succeed(s, job_id, "intruder", {}, 0, {}, None)
        assert lc.renew(s, "intruder", [job_id], 30) == set()
        assert lc.renew(s, "w1", [job_id], 30) == {job_id}


def test_lapsed_lease_is_requeued_once_and_the_old_owner_loses(sessions):
    job_id = add_job(sessions)
    with sessions.begin() as s:
        lc.take(s, job_id, "dead", 30)
    later = lc.utcnow() + timedelta(seconds=31)
    with sessions.begin() as s:
        assert lc.requeue_expired(s, [job_id], now=later) == [(job_id, "m", "normal")]
    with sessions.begin() as s:
        assert lc.requeue_expired(s, [job_id], now=later) == []  # nothing twice
    assert read(sessions, job_id).status == "queued"
    with sessions.begin() as s:
        assert lc.take(s, job_id, "alive", 30)
    with sessions.begin() as s:
        assert not lc.succeed(s, job_id, "dead", {}, 0, {}, None)  # the old owner cannot finish it
        assert lc.succeed(s, job_id, "alive", {}, 0, {}, None)
    assert read(sessions, job_id).attempts == 2


def test_live_lease_is_not_requeued(sessions):
    job_id = add_job(sessions)
    with sessions.begin() as s:
        lc.take(s, job_id, "w1", 30)
    with sessions.begin() as s:
        assert lc.requeue_expired(s, [job_id]) == []
        assert not lc.take(s, job_id, "w2", 30)  # a redelivered message for a live job is dropped


def test_cancel(sessions):
    queued, running, done = add_job(sessions), add_job(sessions), add_job(sessions)
    with sessions.begin() as s:
        lc.take(s, running, "w1", 30)
        lc.take(s, done, "w1", 30)
        lc.fail(s, done, "w1", "boom", "it broke")
    with sessions.begin() as s:
        lc.cancel(s, queued)
        lc.cancel(s, running)
    with sessions.begin() as s:
        assert lc.canceled_among(s, [queued, running, done]) == {queued, running}
        assert not lc.succeed(s, running, "w1", {}, 0, {}, None)  # the worker's result is dropped
        assert not lc.take(s, queued, "w2", 30)
    with pytest.raises(Conflict, match="already failed"):
        with sessions.begin() as s:
            lc.cancel(s, done)
    with pytest.raises(NotFound):
        with sessions.begin() as s:
            lc.cancel(s, "job_nope")


def test_release_gives_the_job_back(sessions):
    job_id = add_job(sessions)
    with sessions.begin() as s:
        lc.take(s, job_id, "w1", 30)
        assert lc.release(s, job_id, "w1")
    job = read(sessions, job_id)
    assert job.status == "queued" and job.lease_owner is None and job.started_at is None
    assert job.attempts == 0  # a job given back did not kill its worker: not an attempt


def test_fail_a_queued_job(sessions):
    job_id = add_job(sessions)
    with sessions.begin() as s:
        assert lc.fail(s, job_id, None, "bad_input", "nope")
    job = read(sessions, job_id)
    assert (job.status, job.error_code) == ("failed", "bad_input")


def test_ids_sort_by_creation():
    ids = [new_id("job") for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == 2000
    assert all(i.startswith("job_") and len(i) == 30 for i in ids)


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_concurrent_migrations_on_a_fresh_database(request, tmp_path, backend):
    """API and workers start together and each migrates; none may fail on the race."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'fresh.sqlite'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    code = f"from vramq.jobs.db import make_engine, migrate; migrate(make_engine({url!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0, 0, 0], [err[-500:] for _, err in results]


def test_event_writer_coalesces_deltas_without_changing_the_text():
    from vramq.jobs.events import _coalesce

    batch = [
        ("a", "delta", {"text": "He"}),
        ("a", "delta", {"text": "llo"}),
        ("b", "delta", {"text": "x"}),
        ("a", "delta", {"text": "!"}),
        ("a", "progress", {"progress": 1.0}),
        ("a", "delta", {"text": "?"}),
    ]
    assert _coalesce(batch) == [
        ("a", "delta", {"text": "Hello"}),
        ("b", "delta", {"text": "x"}),
        ("a", "delta", {"text": "!"}),
        ("a", "progress", {"progress": 1.0}),
        ("a", "delta", {"text": "?"}),
    ]


def test_switching_to_wal_waits_out_a_lock_sqlite_refuses_at_once():
    """SQLite may refuse ``PRAGMA journal_mode=WAL`` with "database is locked" without
    waiting (another process migrating a fresh file, or checkpointing as it closes): the
    connection tries again instead of failing the process's start."""
    import sqlite3

    from vramq.jobs.db import _until_unlocked

    answers = [sqlite3.OperationalError("database is locked")] * 2 + [None]
    calls = []

    def statement():
        calls.append(1)
        answer = answers[len(calls) - 1]
        if answer is not None:
            raise answer

    _until_unlocked(statement)
    assert len(calls) == 3
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        _until_unlocked(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("no such table: t")))
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _until_unlocked(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("database is locked")), seconds=0.2)
