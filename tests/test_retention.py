"""Retention, save and share: the sweeper deletes what is past its time (unsaved outputs,
uploads, batch manifests, shares of expired jobs, old idempotency keys) from the local
store and from S3 (moto server), on SQLite and PostgreSQL; saved outputs and files an
open job or batch needs survive; a store that is down loses nothing; share links are
public until revoked; /metrics counts what was deleted."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
from sqlalchemy import update

from tests.fixtures.http import Harness
from tests.fixtures.procs import free_port
from tests.fixtures.services import services_for
from vramq.api import create_app
from vramq.jobs import idempotency, retention
from vramq.jobs.batches.finisher import finalize
from vramq.jobs.errors import Conflict, NotFound
from vramq.jobs.files import File, get_file, store_file
from vramq.jobs.ids import new_id
from vramq.jobs.schema import Batch, IdempotencyKey, Job, Share
from vramq.jobs.services import Services

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
ANON = "anon:127.0.0.1"
"""The Flask test client's caller: it may read what these helpers make."""
JSONL = b'{"custom_id": "a", "model": "tiny-flux", "input": {"prompt": "p"}}\n'


def finished_job(
    services: Services, owner: str, *, expires_at: datetime, saved: bool = False, batch_id: str | None = None
) -> Job:
    """A succeeded job with one stored image, as a worker leaves it."""
    job_id = new_id("job")
    key = f"jobs/{job_id}/1/0.png"
    services.store.put(key, PNG, "image/png")
    now = expires_at - timedelta(hours=24)
    job = Job(
        id=job_id,
        model="tiny-flux",
        kind="image",
        status="succeeded",
        priority="normal",
        input={"prompt": "p"},
        meta={},
        output={"images": [{"url": {"$object": key}, "content_type": "image/png"}]},
        progress=1.0,
        created_at=now,
        started_at=now,
        finished_at=now,
        attempts=1,
        gpu_seconds=0.1,
        tokens_reserved=100,
        tokens_charged=100,
        usage_detail={},
        caller=owner,
        saved=saved,
        expires_at=expires_at,
        work_units=1.0,
        batch_id=batch_id,
        custom_id="a" if batch_id else None,
    )
    with services.sessions.begin() as s:
        s.add(job)
    return job


def waiting_job(services: Services, inp: dict, status: str = "queued") -> Job:
    """A speech job not finished yet (queued or running) whose input names a file."""
    now = datetime.now(UTC)
    job = Job(
        id=new_id("job"),
        model="tiny-whisper",
        kind="speech",
        status=status,
        priority="normal",
        input=inp,
        meta={},
        progress=0.0,
        created_at=now,
        attempts=0,
        gpu_seconds=0.0,
        tokens_reserved=100,
        tokens_charged=0,
        usage_detail={},
        caller=ANON,
        saved=False,
        work_units=1.0,
    )
    with services.sessions.begin() as s:
        s.add(job)
    return job


def uploaded(services: Services, age: timedelta) -> File:
    """A file uploaded through ``store_file``, ``age`` ago."""
    row = store_file(services, JSONL, "lines.jsonl", "batch", ANON)
    with services.sessions.begin() as s:
        s.execute(update(File).where(File.id == row.id).values(created_at=row.created_at - age))
    return row


def open_batch(services: Services, input_file: str | None = None) -> Batch:
    batch = Batch(
        id=new_id("batch"),
        caller=ANON,
        status="queued",
        priority="low",
        total=1,
        meta={},
        input_file=input_file,
        created_at=datetime.now(UTC),
    )
    with services.sessions.begin() as s:
        s.add(batch)
    return batch


def finished_batch(services: Services, age: timedelta) -> Batch:
    """A batch of one succeeded job whose manifest ``finalize`` wrote ``age`` ago."""
    batch = open_batch(services)
    finished_job(services, ANON, expires_at=datetime.now(UTC) + timedelta(days=30), batch_id=batch.id)
    assert finalize(services, batch.id)
    with services.sessions.begin() as s:
        done = s.get(Batch, batch.id)
        done.finished_at -= age
    return done


def objects(services: Services, job: Job) -> list[str]:
    return services.store.list(f"jobs/{job.id}/")


def stored(services: Services, key: str) -> bool:
    return key in services.store.list(key.rsplit("/", 1)[0])


def row(services: Services, table, ident):
    with services.sessions() as s:
        return s.get(table, ident)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.e2e), "postgresql"])  # s3: the moto server
def services(request, make_settings):
    """The local store on SQLite, S3 (a fresh bucket on the moto server) on SQLite, and
    the local store on PostgreSQL."""
    database = {"database_url": request.getfixturevalue("pg_url")} if request.param == "postgresql" else {}
    settings, _ = make_settings(**database)
    services = services_for(settings)
    if request.param == "s3":
        services.store = request.getfixturevalue("s3_store")
    return services


def test_sweep_removes_expired_unsaved_outputs_and_keeps_saved_ones(services):
    now = datetime.now(UTC)
    expired = finished_job(services, "anon:1.2.3.4", expires_at=now - timedelta(minutes=1))
    saved = finished_job(services, "anon:1.2.3.4", expires_at=now - timedelta(minutes=1), saved=True)
    fresh = finished_job(services, "anon:1.2.3.4", expires_at=now + timedelta(hours=1))
    assert all(objects(services, j) for j in (expired, saved, fresh))

    assert retention.sweep(services, now).outputs == [expired.id]
    assert objects(services, expired) == []
    assert objects(services, saved) and objects(services, fresh)
    with services.sessions() as s:
        row = s.get(Job, expired.id)
        assert row.output is None and row.outputs_expired_at is not None
        assert row.status == "succeeded" and row.input == {"prompt": "p"} and row.tokens_charged == 100  # metadata kept
        # Saving comes too late once the sweep has marked the job.
        with pytest.raises(Conflict):
            retention.save(s, row)
    assert not retention.sweep(services, now)  # nothing left to do


def test_a_sweep_that_cannot_reach_storage_retries_later(make_settings):
    settings, _ = make_settings()
    services = services_for(settings)
    now = datetime.now(UTC)
    job = finished_job(services, "anon:1.2.3.4", expires_at=now - timedelta(minutes=1))

    class Down:
        def delete_prefix(self, prefix):
            raise ConnectionError("storage unreachable")

    real = services.store
    services.store = Down()
    assert retention.sweep(services, now).outputs == []
    with services.sessions() as s:
        row = s.get(Job, job.id)
        assert row.outputs_expired_at is not None and row.output is not None  # marked, objects pending
    services.store = real
    assert objects(services, job)
    assert retention.sweep(services, now).outputs == [job.id]
    assert objects(services, job) == []


def test_save_share_and_revoke_over_http(make_settings):
    settings, _ = make_settings()
    h = Harness(services_for(settings))
    account_id, key = h.account()
    now = datetime.now(UTC)
    job = finished_job(h.services, account_id, expires_at=now + timedelta(hours=1))

    # Anonymous callers cannot save (results of signed-in users are kept).
    assert h.call("POST", f"/v1/jobs/{job.id}/save").status_code == 401
    saved = h.call("POST", f"/v1/jobs/{job.id}/save", key).get_json()
    assert saved["saved"] is True and saved["expires_at"] is None
    assert retention.sweep(h.services, now + timedelta(hours=2)).outputs == []
    assert objects(h.services, job)

    shared = h.call("POST", f"/v1/jobs/{job.id}/share", key).get_json()
    assert shared["url"].endswith(f"/s/{shared['token']}")
    assert h.call("POST", f"/v1/jobs/{job.id}/share", key).get_json()["token"] == shared["token"]  # one live link
    public = h.call("GET", f"/s/{shared['token']}")  # no key
    assert public.status_code == 200
    body = public.get_json()
    assert body["id"] == job.id and "usage" not in body and "metadata" not in body
    link = body["output"]["images"][0]["url"]
    url = urlsplit(link)
    assert h.http.get(f"{url.path}?{url.query}").data == PNG  # the signed link works without a key

    assert h.call("DELETE", f"/v1/jobs/{job.id}/share", key).get_json() == {"revoked": 1}
    gone = h.call("GET", f"/s/{shared['token']}")
    assert gone.status_code == 404 and gone.get_json()["code"] == "not_found"
    again = h.call("POST", f"/v1/jobs/{job.id}/share", key).get_json()
    assert again["token"] != shared["token"] and h.call("GET", f"/s/{again['token']}").status_code == 200

    # Unsaved again, it expires at the next sweep past its time, and says so.
    h.call("DELETE", f"/v1/jobs/{job.id}/save", key)
    report = retention.sweep(h.services, now + timedelta(hours=2))
    assert report.outputs == [job.id] and report.shares_revoked == 1
    after = h.call("GET", f"/v1/jobs/{job.id}", key).get_json()
    assert after["outputs_expired"] is True and after["output"] is None and after["status"] == "succeeded"
    assert h.call("POST", f"/v1/jobs/{job.id}/save", key).status_code == 409
    # Its public link went with its outputs.
    assert h.call("GET", f"/s/{again['token']}").status_code == 404


@pytest.mark.e2e
def test_the_sweeper_command_runs_a_sweep(make_settings):
    settings, env = make_settings(retention_hours=1)
    services = services_for(settings)
    job = finished_job(services, "anon:1.2.3.4", expires_at=datetime.now(UTC) - timedelta(seconds=5))
    upload = uploaded(services, timedelta(hours=25))
    out = subprocess.run(
        [sys.executable, "-m", "vramq.api.cli", "sweeper", "--once"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "expired the outputs of 1 jobs; deleted 1 uploaded files" in out.stderr
    assert objects(services, job) == [] and not stored(services, upload.key)
    # The sweeper's totals reach the API process through Redis.
    assert retention.deleted_totals(services.redis) == {
        "outputs": 1,
        "files": 1,
        "manifests": 0,
        "shares": 0,
        "idempotency_keys": 0,
    }


# --- everything else a caller sent or got ----------------------------------------------


def test_uploads_are_deleted_after_their_time_unless_an_open_job_or_batch_needs_them(services):
    old = uploaded(services, timedelta(hours=25))
    fresh = uploaded(services, timedelta(hours=23))
    for_job = uploaded(services, timedelta(hours=25))
    for_running = uploaded(services, timedelta(hours=25))
    for_batch = uploaded(services, timedelta(hours=25))
    job = waiting_job(services, {"audio": for_job.id, "language": "en"})
    running = waiting_job(services, {"audio": for_running.id}, status="running")
    batch = open_batch(services, input_file=for_batch.id)
    http = create_app(services=services).test_client()
    assert http.get(f"/v1/files/{old.id}").status_code == 200

    now = datetime.now(UTC)
    assert retention.sweep(services, now).files == [old.id]
    assert not stored(services, old.key) and row(services, File, old.id) is None
    gone = http.get(f"/v1/files/{old.id}")
    assert gone.status_code == 404 and gone.get_json()["code"] == "not_found"
    with pytest.raises(NotFound):
        get_file(services, old.id)
    for kept in (fresh, for_job, for_running, for_batch):
        assert stored(services, kept.key) and row(services, File, kept.id) is not None
        assert http.get(f"/v1/files/{kept.id}").status_code == 200

    # Once the job and the batch are over, their files go at the next sweep.
    with services.sessions.begin() as s:
        s.execute(update(Job).where(Job.id.in_([job.id, running.id])).values(status="succeeded", finished_at=now))
        s.execute(update(Batch).where(Batch.id == batch.id).values(finished_at=now, status="completed"))
    assert sorted(retention.sweep(services, now).files) == sorted([for_job.id, for_running.id, for_batch.id])
    for swept in (for_job, for_running, for_batch):
        assert not stored(services, swept.key) and row(services, File, swept.id) is None
    assert stored(services, fresh.key)
    assert not retention.sweep(services, now)  # nothing left to do


def test_batch_manifests_are_deleted_after_their_time_and_read_as_null(services):
    expired = finished_batch(services, timedelta(hours=25))
    fresh = finished_batch(services, timedelta(hours=23))
    http = create_app(services=services).test_client()
    before = http.get(f"/v1/batches/{expired.id}").get_json()
    assert before["results_url"] and stored(services, expired.results_key)

    report = retention.sweep(services, datetime.now(UTC))
    assert report.manifests == [expired.id] and report.outputs == []  # the jobs' own outputs keep their time
    assert not stored(services, expired.results_key)
    assert row(services, Batch, expired.id).results_key is None
    after = http.get(f"/v1/batches/{expired.id}").get_json()
    assert after["results_url"] is None
    assert after["status"] == "completed" and after["counts"]["succeeded"] == 1  # the batch's history stays
    assert stored(services, fresh.results_key) and row(services, Batch, fresh.id).results_key == fresh.results_key
    assert http.get(f"/v1/batches/{fresh.id}").get_json()["results_url"]


def test_shares_of_expired_jobs_are_revoked_and_revoked_shares_deleted_later(services):
    now = datetime.now(UTC)
    expired = finished_job(services, ANON, expires_at=now - timedelta(minutes=1))
    fresh = finished_job(services, ANON, expires_at=now + timedelta(hours=1))
    with services.sessions.begin() as s:
        of_expired = retention.share(s, s.get(Job, expired.id), now - timedelta(hours=2)).token
        of_fresh = retention.share(s, s.get(Job, fresh.id), now - timedelta(hours=2)).token
        s.add(
            Share(
                token="long-revoked",
                job_id=fresh.id,
                created_at=now - timedelta(hours=30),
                revoked_at=now - timedelta(hours=25),
            )
        )
        s.add(
            Share(
                token="just-revoked",
                job_id=fresh.id,
                created_at=now - timedelta(hours=3),
                revoked_at=now - timedelta(hours=1),
            )
        )

    report = retention.sweep(services, now)
    assert report.outputs == [expired.id] and report.shares_revoked == 1 and report.shares == 1
    assert row(services, Share, of_expired).revoked_at == now
    with services.sessions() as s:
        assert retention.shared_job(s, of_expired) is None  # /s/<token> is 404
        assert retention.shared_job(s, of_fresh).id == fresh.id
    assert row(services, Share, "long-revoked") is None and row(services, Share, "just-revoked") is not None

    # A day on: the share the sweep revoked goes, and so does the fresh job's (now expired).
    later = retention.sweep(services, now + timedelta(hours=24, minutes=1))
    assert later.outputs == [fresh.id] and later.shares == 2 and later.shares_revoked == 1
    assert row(services, Share, of_expired) is None and row(services, Share, "just-revoked") is None
    assert row(services, Share, of_fresh).revoked_at is not None


def test_idempotency_keys_past_their_window_are_deleted(services):
    now = datetime.now(UTC)
    with services.sessions.begin() as s:
        for key, age in (("old", 25), ("fresh", 23)):
            s.add(
                IdempotencyKey(
                    caller=ANON,
                    key=key,
                    request_hash="h",
                    resource_id=f"job_{key}",
                    created_at=now - timedelta(hours=age),
                )
            )
    assert retention.sweep(services, now).idempotency_keys == 1
    assert row(services, IdempotencyKey, (ANON, "old")) is None
    assert idempotency.replay(services, ANON, "fresh", "h") == "job_fresh"


def test_the_idempotency_window_is_a_setting(make_settings):
    settings, _ = make_settings(idempotency_hours=2, upload_retention_hours=0.5)
    assert (settings.idempotency_hours, settings.upload_retention_hours) == (2, 0.5)
    services = services_for(settings)
    now = datetime.now(UTC)
    with services.sessions.begin() as s:
        s.add(
            IdempotencyKey(
                caller=ANON, key="k", request_hash="h", resource_id="job_a", created_at=now - timedelta(hours=1)
            )
        )
        s.add(
            IdempotencyKey(
                caller=ANON, key="stale", request_hash="h", resource_id="job_b", created_at=now - timedelta(hours=3)
            )
        )
    assert idempotency.replay(services, ANON, "k", "h") == "job_a"
    with pytest.raises(Conflict):
        idempotency.replay(services, ANON, "k", "other body")
    # Past the 2-hour window the key is free again, with another body.
    assert idempotency.replay(services, ANON, "stale", "other body") is None
    with services.sessions.begin() as s:
        idempotency.remember(s, ANON, "stale", "other body", "job_c")
    assert idempotency.replay(services, ANON, "stale", "other body") == "job_c"
    assert retention.sweep(services, now + timedelta(hours=2, minutes=1)).idempotency_keys == 2


def test_storage_down_during_a_sweep_loses_nothing_and_the_next_sweep_finishes(make_settings, s3_store):
    """The store is S3 (moto); the sweep first reaches it through an endpoint where
    nothing listens, as when the store is down."""
    from vramq.storage.s3 import S3Store

    settings, _ = make_settings()
    services = services_for(settings)
    services.store = s3_store
    now = datetime.now(UTC)
    job = finished_job(services, ANON, expires_at=now - timedelta(minutes=1))
    upload = uploaded(services, timedelta(hours=25))
    batch = finished_batch(services, timedelta(hours=25))

    services.store = S3Store(s3_store.bucket, prefix="vramq", endpoint_url=f"http://127.0.0.1:{free_port()}")
    report = retention.sweep(services, now)
    assert (report.outputs, report.files, report.manifests) == ([], [], [])
    assert row(services, Job, job.id).output is not None  # marked, objects pending
    assert row(services, File, upload.id) is not None
    assert row(services, Batch, batch.id).results_key == batch.results_key

    services.store = s3_store
    assert objects(services, job) and stored(services, upload.key) and stored(services, batch.results_key)
    report = retention.sweep(services, now)
    assert (report.outputs, report.files, report.manifests) == ([job.id], [upload.id], [batch.id])
    assert objects(services, job) == [] and not stored(services, upload.key) and not stored(services, batch.results_key)
    assert row(services, File, upload.id) is None and row(services, Batch, batch.id).results_key is None


def test_metrics_count_what_the_sweeps_deleted(make_settings):
    settings, _ = make_settings()
    services = services_for(settings)
    http = create_app(services=services).test_client()

    def deleted() -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = http.get("/metrics").get_data(as_text=True)
        family = next(f for f in text_string_to_metric_families(text) if f.name == "vramq_retention_deleted")
        return {s.labels["what"]: s.value for s in family.samples if s.name == "vramq_retention_deleted_total"}

    assert deleted() == {"outputs": 0, "files": 0, "manifests": 0, "shares": 0, "idempotency_keys": 0}
    now = datetime.now(UTC)
    finished_job(services, ANON, expires_at=now - timedelta(minutes=1))
    uploaded(services, timedelta(hours=25))
    finished_batch(services, timedelta(hours=25))
    with services.sessions.begin() as s:
        s.add(
            Share(token="t", job_id="job_x", created_at=now - timedelta(hours=30), revoked_at=now - timedelta(hours=25))
        )
        s.add(
            IdempotencyKey(
                caller=ANON, key="k", request_hash="h", resource_id="job_x", created_at=now - timedelta(hours=25)
            )
        )
    retention.sweep(services, now)
    assert deleted() == {"outputs": 1, "files": 1, "manifests": 1, "shares": 1, "idempotency_keys": 1}
    uploaded(services, timedelta(hours=25))
    uploaded(services, timedelta(hours=25))
    retention.sweep(services, now)  # totals add up across sweeps (and sweeper processes)
    assert deleted() == {"outputs": 1, "files": 3, "manifests": 1, "shares": 1, "idempotency_keys": 1}


def test_an_upload_whose_row_cannot_be_written_leaves_no_object(make_settings, pg_url):
    """PostgreSQL refuses a caller longer than its column: the bytes already stored are
    deleted again, since no row will ever lead the sweeper to them."""
    from sqlalchemy.exc import DBAPIError

    settings, _ = make_settings(database_url=pg_url)
    services = services_for(settings)
    with pytest.raises(DBAPIError):
        store_file(services, JSONL, "lines.jsonl", "batch", "anon:" + "9" * 100)
    assert services.store.list("files") == []
