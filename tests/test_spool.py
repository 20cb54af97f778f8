"""The worker's spool: outputs the store refused wait on disk, with backoff, and land when
it answers; past the deadline, or past the spool's size, the job is given up. Real
stores: an S3 endpoint where nothing listens (the store down) and a local one (back up)."""

from __future__ import annotations

from tests.fixtures.procs import free_port
from vramq.gpu_workers.backends.base import Artifact
from vramq.gpu_workers.spool import Spool
from vramq.storage import open_store
from vramq.storage.s3 import S3Store


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def down_store() -> S3Store:
    return S3Store("out", prefix="x", endpoint_url=f"http://127.0.0.1:{free_port()}")


def test_outputs_wait_on_disk_with_backoff_and_land_when_the_store_returns(tmp_path, aws_credentials):
    clock, stored, given_up = Clock(), [], []
    spool = Spool(tmp_path / "spool", down_store(), max_seconds=600, clock=clock)
    spool.directory.mkdir(parents=True)
    arts = [Artifact("image-0.png", b"\x89PNG one", "image/png"), Artifact("image-1.png", b"\x89PNG two", "image/png")]
    spool.hold("job_1", "jobs/job_1/1/", arts, "connection refused", stored.append, given_up.append)
    assert spool.held == ["job_1"] and sorted(p.name for p in (tmp_path / "spool" / "job_1").iterdir()) == ["0", "1"]

    assert spool.retry_due() == 0  # the first backoff (1 s) has not passed
    waits = []
    for _ in range(4):  # still down: 2 s, 4 s, 8 s, 16 s between tries
        before = spool._held["job_1"].next_at
        clock.now = before
        assert spool.retry_due() == 0
        waits.append(spool._held["job_1"].next_at - clock.now)
    assert waits == [2.0, 4.0, 8.0, 16.0] and not stored and not given_up

    spool.store = open_store(f"file://{tmp_path / 'objects'}", secret_key="k")  # the store is back
    clock.now += 16
    assert spool.retry_due() == 1
    assert stored == [{"image-0.png": "jobs/job_1/1/image-0.png", "image-1.png": "jobs/job_1/1/image-1.png"}]
    assert spool.store.get("jobs/job_1/1/image-1.png") == b"\x89PNG two"
    assert spool.held == [] and not (tmp_path / "spool" / "job_1").exists() and not given_up


def test_past_the_deadline_the_job_is_given_up(tmp_path, aws_credentials):
    clock, given_up = Clock(), []
    spool = Spool(tmp_path / "spool", down_store(), max_seconds=30, clock=clock)
    spool.directory.mkdir(parents=True)
    spool.hold("job_2", "jobs/job_2/1/", [Artifact("a.txt", b"x", "text/plain")], "refused", None, given_up.append)
    clock.now += 31
    assert spool.retry_due() == 0
    assert len(given_up) == 1 and "unavailable for 30s" in given_up[0] and spool.held == []


def test_a_full_spool_gives_up_at_once(tmp_path):
    given_up = []
    spool = Spool(tmp_path / "spool", down_store(), max_bytes=10)
    spool.directory.mkdir(parents=True)
    spool.hold(
        "job_3",
        "jobs/job_3/1/",
        [Artifact("a.bin", b"0123456789ab", "application/octet-stream")],
        "refused",
        None,
        given_up.append,
    )
    assert spool.held == [] and "spool is full" in given_up[0]


def test_a_failed_record_keeps_the_job_and_tries_again(tmp_path):
    """The store is back but the database is not: the outcome cannot be recorded yet, so
    the job stays held (storing the same keys again is harmless)."""
    clock, calls = Clock(), []

    def record(keys):
        calls.append(keys)
        if len(calls) == 1:
            raise ConnectionError("database down")

    spool = Spool(tmp_path / "spool", open_store(f"file://{tmp_path / 'objects'}", secret_key="k"), clock=clock)
    spool.directory.mkdir(parents=True)
    spool.hold("job_4", "jobs/job_4/1/", [Artifact("a.txt", b"x", "text/plain")], "refused", record, None)
    clock.now += 1
    assert spool.retry_due() == 0 and spool.held == ["job_4"]
    clock.now += 2
    assert spool.retry_due() == 1 and len(calls) == 2 and spool.held == []
