"""Retention, save and share: the sweeper deletes unsaved outputs past their time from
the local store and from S3 (moto server); saved outputs survive; share links are
public until revoked."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import pytest

from jobs import retention
from jobs.errors import Conflict
from jobs.ids import new_id
from jobs.schema import Job
from jobs.services import Services
from tests.test_accounts import Harness

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


def finished_job(services: Services, owner: str, *, expires_at: datetime, saved: bool = False) -> Job:
    """A succeeded job with one stored image, as a worker leaves it."""
    job_id = new_id("job")
    key = f"jobs/{job_id}/1/0.png"
    services.store.put(key, PNG, "image/png")
    now = expires_at - timedelta(hours=24)
    job = Job(id=job_id, model="tiny-flux", kind="image", status="succeeded", priority="normal", input={"prompt": "p"},
              meta={}, output={"images": [{"url": {"$object": key}, "content_type": "image/png"}]}, progress=1.0,
              created_at=now, started_at=now, finished_at=now, attempts=1, gpu_seconds=0.1, tokens_reserved=100,
              tokens_charged=100, usage_detail={}, caller=owner, saved=saved, expires_at=expires_at, work_units=1.0)
    with services.sessions.begin() as s:
        s.add(job)
    return job


def objects(services: Services, job: Job) -> list[str]:
    return services.store.list(f"jobs/{job.id}/")


@pytest.fixture(params=["local", "s3"])
def services(request, make_settings):
    settings, _ = make_settings()
    services = Services.from_settings(settings)
    if request.param == "s3":
        services.store = request.getfixturevalue("s3_store")  # a fresh bucket on the moto server
    return services


def test_sweep_removes_expired_unsaved_outputs_and_keeps_saved_ones(services):
    now = datetime.now(timezone.utc)
    expired = finished_job(services, "anon:1.2.3.4", expires_at=now - timedelta(minutes=1))
    saved = finished_job(services, "anon:1.2.3.4", expires_at=now - timedelta(minutes=1), saved=True)
    fresh = finished_job(services, "anon:1.2.3.4", expires_at=now + timedelta(hours=1))
    assert all(objects(services, j) for j in (expired, saved, fresh))

    assert retention.sweep(services, now) == [expired.id]
    assert objects(services, expired) == []
    assert objects(services, saved) and objects(services, fresh)
    with services.sessions() as s:
        row = s.get(Job, expired.id)
        assert row.output is None and row.outputs_expired_at is not None
        assert row.status == "succeeded" and row.input == {"prompt": "p"} and row.tokens_charged == 100  # metadata kept
        # Saving comes too late once the sweep has marked the job.
        with pytest.raises(Conflict):
            retention.save(s, row)
    assert retention.sweep(services, now) == []  # nothing left to do


def test_a_sweep_that_cannot_reach_storage_retries_later(make_settings):
    settings, _ = make_settings()
    services = Services.from_settings(settings)
    now = datetime.now(timezone.utc)
    job = finished_job(services, "anon:1.2.3.4", expires_at=now - timedelta(minutes=1))

    class Down:
        def delete_prefix(self, prefix):
            raise ConnectionError("storage unreachable")

    real = services.store
    services.store = Down()
    assert retention.sweep(services, now) == []
    with services.sessions() as s:
        row = s.get(Job, job.id)
        assert row.outputs_expired_at is not None and row.output is not None  # marked, objects pending
    services.store = real
    assert objects(services, job)
    assert retention.sweep(services, now) == [job.id]
    assert objects(services, job) == []


def test_save_share_and_revoke_over_http(make_settings):
    settings, _ = make_settings()
    h = Harness(Services.from_settings(settings))
    account_id, key = h.account()
    now = datetime.now(timezone.utc)
    job = finished_job(h.services, account_id, expires_at=now + timedelta(hours=1))

    # Anonymous callers cannot save (results of signed-in users are kept).
    assert h.call("POST", f"/v1/jobs/{job.id}/save").status_code == 401
    saved = h.call("POST", f"/v1/jobs/{job.id}/save", key).get_json()
    assert saved["saved"] is True and saved["expires_at"] is None
    assert retention.sweep(h.services, now + timedelta(hours=2)) == []
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
    assert retention.sweep(h.services, now + timedelta(hours=2)) == [job.id]
    after = h.call("GET", f"/v1/jobs/{job.id}", key).get_json()
    assert after["outputs_expired"] is True and after["output"] is None and after["status"] == "succeeded"
    assert h.call("POST", f"/v1/jobs/{job.id}/save", key).status_code == 409
    assert h.call("GET", f"/s/{again['token']}").get_json()["outputs_expired"] is True


def test_the_sweeper_command_runs_a_sweep(make_settings):
    settings, env = make_settings(retention_hours=1)
    services = Services.from_settings(settings)
    job = finished_job(services, "anon:1.2.3.4", expires_at=datetime.now(timezone.utc) - timedelta(seconds=5))
    out = subprocess.run([sys.executable, "-m", "api.cli", "sweeper", "--once"], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "expired the outputs of 1 jobs" in out.stderr
    assert objects(services, job) == []
