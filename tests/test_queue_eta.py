"""Queue position and ETA while a job is queued: from the jobs ahead of it and the
model's recent throughput."""

from __future__ import annotations

from datetime import timedelta

from tests.fixtures.http import IMAGE, Harness
from tests.fixtures.services import services_for
from vramq.jobs.ids import new_id
from vramq.jobs.lifecycle import utcnow
from vramq.jobs.schema import Job


def test_queue_position_and_eta_follow_recent_throughput(make_settings):
    settings, _ = make_settings()
    h = Harness(services_for(settings))
    _, key = h.account()
    # No history yet: a position, but no ETA (nothing to base it on).
    first = h.submit(key).get_json()
    # The submit's answer does not count the queue (that would cost more than the submit):
    # the job's own URL does.
    assert first["queue_position"] is None and first["eta_seconds"] is None
    first = h.call("GET", f"/v1/jobs/{first['id']}", key).get_json()
    assert first["queue_position"] == 0 and first["eta_seconds"] is None

    # Eleven jobs finished two seconds apart in the last minute: 0.5 jobs a second.
    now = utcnow()
    with h.services.sessions.begin() as s:
        for k in range(11):
            done = now - timedelta(seconds=60 - 2 * k)
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
                    created_at=done,
                    finished_at=done,
                    attempts=1,
                    gpu_seconds=0.1,
                    tokens_reserved=0,
                    tokens_charged=0,
                    usage_detail={},
                    saved=False,
                    caller="someone",
                )
            )
    import vramq.api.views

    vramq.api.views._throughput.clear()
    jobs = [h.submit(key).get_json() for _ in range(2)]
    seen = [h.call("GET", f"/v1/jobs/{j['id']}", key).get_json() for j in [first, *jobs]]
    assert [j["queue_position"] for j in seen] == [0, 1, 2]
    assert [j["eta_seconds"] for j in seen] == [2.0, 4.0, 6.0]
    # A high-priority job goes ahead of the normal ones.
    urgent = h.submit(key, {**IMAGE, "priority": "high"}).get_json()
    assert h.call("GET", f"/v1/jobs/{urgent['id']}", key).get_json()["queue_position"] == 0
    assert h.call("GET", f"/v1/jobs/{jobs[-1]['id']}", key).get_json()["queue_position"] == 3
    # Once it is not queued, neither field applies.
    canceled = h.call("POST", f"/v1/jobs/{urgent['id']}/cancel", key).get_json()
    assert canceled["queue_position"] is None and canceled["eta_seconds"] is None
