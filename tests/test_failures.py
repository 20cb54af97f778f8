"""Cancellation and failure: cancel queued and running jobs, a worker killed mid-job,
the broker going away. Real processes, real Redis."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis
import requests

from tests.conftest import settings_env
from tests.fixtures.slow_image import SLOW, SLOW_CATALOG, wait_running
from vramq.jobs import events

pytestmark = pytest.mark.e2e


def objects(env, job_id: str) -> list[Path]:
    root = Path(env["VRAMQ_DATA_DIR"]) / "objects" / "jobs" / job_id
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_cancel_queued_job_never_runs(env, cluster_factory):
    cluster = cluster_factory(env)
    cluster.start_api()
    cluster.announce_loading_worker(["tiny-flux"])  # admitted, and nothing takes it yet
    job = cluster.post("/v1/jobs", json={"model": "tiny-flux", "input": {"prompt": "x", "steps": 2}}).json()
    assert cluster.get(f"/v1/jobs/{job['id']}").json()["queue_position"] == 0
    canceled = cluster.post(f"/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    again = cluster.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["code"] == "conflict"

    cluster.start_worker()
    later = cluster.wait_job(
        cluster.post("/v1/jobs", json={"model": "tiny-flux", "input": {"prompt": "y", "steps": 2}}).json()["id"]
    )
    assert later["status"] == "succeeded"  # the worker drained the queue past the canceled message
    final = cluster.get(f"/v1/jobs/{job['id']}").json()
    assert final["status"] == "canceled" and final["started_at"] is None and final["attempts"] == 0
    assert objects(env, job["id"]) == []
    # Canceled before it started: its whole reservation came back; only the later job is charged.
    assert final["usage"]["tokens_reserved"] >= 100 and final["usage"]["tokens_charged"] == 0
    assert cluster.get("/v1/usage").json()["used_today"] == later["usage"]["tokens_charged"] > 0


def test_cancel_running_job_stops_between_steps(env, cluster_factory):
    cluster = cluster_factory(env)
    cluster.start_api()
    cluster.start_worker()
    job = cluster.post("/v1/jobs", json={"model": "tiny-flux", "input": SLOW}).json()
    wait_running(cluster, job["id"])
    resp = cluster.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    # The worker is free again long before the 600 steps would have finished.
    nxt = cluster.wait_job(
        cluster.post("/v1/jobs", json={"model": "tiny-flux", "input": {"prompt": "n", "steps": 2}}).json()["id"]
    )
    assert nxt["status"] == "succeeded"
    final = cluster.get(f"/v1/jobs/{job['id']}").json()
    assert final["status"] == "canceled" and final["output"] is None and final["progress"] < 0.9
    assert objects(env, job["id"]) == []
    # Canceled while running: charged the model's minimum, the rest of the reservation returned.
    assert final["usage"]["tokens_charged"] == 100 < final["usage"]["tokens_reserved"]
    # The pipeline stopped between steps: the progress the worker streamed never came
    # near the end of the 600 steps (had it run on, it would have reached 1.0).
    import redis

    from vramq.jobs import events

    stream = events.read(redis.Redis.from_url(env["VRAMQ_BROKER_URL"]), job["id"])
    progress = [data["progress"] for _id, event, data in stream if event == "progress"]
    assert progress and max(progress) < 0.5, progress
    assert [e for _id, e, _d in stream if e in ("status", "done")][-2:] == ["status", "done"]


def test_worker_killed_mid_job_runs_it_exactly_once(env, cluster_factory):
    cluster = cluster_factory(env)
    cluster.start_api()
    first = cluster.start_worker()
    job = cluster.post("/v1/jobs", json={"model": "tiny-flux", "input": {**SLOW, "steps": 300}}).json()
    running = wait_running(cluster, job["id"], min_progress=0.1)
    assert running["attempts"] == 1
    first.kill_group()  # SIGKILL, like the OOM killer taking the worker and its children

    cluster.start_worker()  # its reaper notices the lapsed lease and queues the job again
    done = cluster.wait_job(job["id"], timeout=120)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    files = objects(env, job["id"])
    assert [p.relative_to(Path(env["VRAMQ_DATA_DIR"]) / "objects" / "jobs" / job["id"]).as_posix() for p in files] == [
        "2/image-0.png"
    ]

    # Redis redelivers the killed worker's unacknowledged message after the visibility
    # timeout (8 s here). The new worker must drop it: no third run, no second output.
    time.sleep(8 + 12)
    after = cluster.get(f"/v1/jobs/{job['id']}").json()
    assert after["status"] == "succeeded" and after["attempts"] == 2 and after["finished_at"] == done["finished_at"]
    assert objects(env, job["id"]) == files


def test_a_stopping_worker_gives_back_the_jobs_still_running_after_its_grace_period(env, cluster_factory):
    """SIGTERM: running jobs get --stop-grace seconds; the ones still running then are
    handed back (queued again at once, the attempt not counted), never lost, and the
    worker exits with its engine processes."""
    cluster = cluster_factory(env)
    cluster.start_api()
    worker = cluster._spawn("worker", ["worker", "--cpu", "--stop-grace", "2"])
    cluster._wait(
        worker, lambda: any(w["pid"] == worker.popen.pid and w["state"] == "ready" for w in cluster.workers()), 120
    )
    job = cluster.post("/v1/jobs", json={"model": "tiny-flux", "input": SLOW}).json()
    wait_running(cluster, job["id"], min_progress=0.02)
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.popen.wait(timeout=30) != 0  # it did not finish the job; it gave it back
    back = cluster.get(f"/v1/jobs/{job['id']}").json()
    assert back["status"] == "queued" and back["attempts"] == 0 and back["started_at"] is None, back
    cluster.start_worker()  # takes the given-back turn at once: no lease to wait for
    done = cluster.wait_job(job["id"], timeout=120)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert [p.parent.name for p in objects(env, job["id"])] == ["1"]


def test_readyz_follows_the_broker(tmp_path, models_dir, private_redis):
    import redis

    from tests.fixtures.services import services_for
    from vramq.api import create_app
    from vramq.jobs import heartbeat
    from vramq.jobs.schema import Job
    from vramq.jobs.settings import Settings

    settings = Settings.from_env(settings_env(tmp_path, redis_url=private_redis.url, models_dir=models_dir))
    client = create_app(services=services_for(settings)).test_client()
    assert client.get("/readyz").status_code == 200
    private_redis.stop()
    down = client.get("/readyz")
    assert down.status_code == 503
    assert down.json["checks"]["broker"].startswith("unavailable") and down.json["checks"]["database"] == "ok"
    # Submitting while the broker is down is refused, not silently queued.
    resp = client.post("/v1/jobs", json={"model": "tiny-flux", "input": {"prompt": "x"}})
    assert resp.status_code == 503 and resp.json["code"] == "service_unavailable"
    private_redis.start()
    assert client.get("/readyz").status_code == 200
    # A worker for the model registers (still loading: it takes nothing in this test).
    heartbeat.announce(
        redis.Redis.from_url(private_redis.url), "w", {"name": "w", "models": ["tiny-flux"], "state": "loading"}
    )
    time.sleep(1.1)  # the API's view of live workers is cached for a second
    assert client.post("/v1/jobs", json={"model": "tiny-flux", "input": {"prompt": "x"}}).status_code == 202
    # The refused job left nothing behind; the accepted one is queued.
    with client.application.config["VRAMQ"].sessions() as s:
        assert [j.status for j in s.query(Job).all()] == ["queued"]


def test_broker_restart_loses_no_queued_job_and_workers_reconnect(tmp_path, models_dir, private_redis, cluster_factory):
    cluster = cluster_factory(settings_env(tmp_path, redis_url=private_redis.url, models_dir=models_dir))
    cluster.start_api()
    worker = cluster.start_worker(models="tiny-flux")
    small = {"model": "tiny-flux", "input": {"prompt": "r", "steps": 2}}
    assert cluster.wait_job(cluster.post("/v1/jobs", json=small).json()["id"])["status"] == "succeeded"
    worker.stop()  # nobody consumes: the next job waits in Redis
    cluster.announce_loading_worker(["tiny-flux"])  # a worker on its way: jobs are still admitted
    queued = cluster.post("/v1/jobs", json=small).json()
    private_redis.stop()
    private_redis.start()  # the append-only file brings the message back
    cluster.start_worker(models="tiny-flux")
    assert cluster.wait_job(queued["id"])["status"] == "succeeded"
    # A worker that lives through a broker restart reconnects and keeps serving.
    private_redis.stop()
    time.sleep(1)
    private_redis.start()
    assert cluster.wait_job(cluster.post("/v1/jobs", json=small).json()["id"], timeout=90)["status"] == "succeeded"


def test_storage_down_spools_the_outputs_and_the_job_succeeds_when_the_store_returns(
    tmp_path, redis_url, models_dir, private_s3, cluster_factory
):
    """Paid GPU work is not thrown away when the store is down: the outputs wait on the
    worker's disk (the job stays running under its renewed lease) and land when the store
    answers again; past VRAMQ_SPOOL_SECONDS the job fails storage_unavailable, refunded."""
    import boto3

    def make_bucket():
        boto3.client("s3", endpoint_url=private_s3.url).create_bucket(Bucket="out")

    make_bucket()
    cluster = cluster_factory(
        settings_env(
            tmp_path,
            redis_url=redis_url,
            models_dir=models_dir,
            storage_url="s3://out/x",
            s3_endpoint_url=private_s3.url,
            lease_seconds=2,
            visibility_timeout=8,
            spool_seconds=12,
        )
    )
    cluster.start_api()
    cluster.start_worker(models="tiny-flux")
    small = {"model": "tiny-flux", "input": {"prompt": "s", "steps": 2}}
    assert cluster.wait_job(cluster.post("/v1/jobs", json=small).json()["id"])["status"] == "succeeded"

    private_s3.stop()
    assert cluster.get("/readyz").json()["checks"]["storage"].startswith("unavailable")
    job = cluster.post("/v1/jobs", json=small).json()
    spooled = wait_running(cluster, job["id"], min_progress=1.0)
    time.sleep(3 * 2)  # three leases: the worker keeps renewing it, nobody else takes it
    held = cluster.get(f"/v1/jobs/{job['id']}").json()
    assert held["status"] == "running" and held["attempts"] == spooled["attempts"] == 1, held
    private_s3.start()
    make_bucket()  # moto keeps nothing across restarts
    done = cluster.wait_job(job["id"], timeout=60)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    image = requests.get(done["output"]["images"][0]["url"], timeout=10)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert done["usage"]["tokens_charged"] > 0

    # Down for longer than the spool keeps trying: failed, refunded, and the worker goes on.
    private_s3.stop()
    failed = cluster.wait_job(cluster.post("/v1/jobs", json=small).json()["id"], timeout=90)
    assert failed["status"] == "failed" and failed["error"]["code"] == "storage_unavailable", failed
    assert "unavailable for 12s" in failed["error"]["message"]
    assert failed["usage"]["tokens_reserved"] > 0 and failed["usage"]["tokens_charged"] == 0
    private_s3.start()
    make_bucket()
    assert cluster.wait_job(cluster.post("/v1/jobs", json=small).json()["id"])["status"] == "succeeded"


def test_a_job_that_kills_its_workers_ends_failed_worker_lost_after_the_cap(env, cluster_factory):
    """A job whose run kills its worker (a native crash, a CUDA fault: here, SIGKILL while
    it runs) is not queued again forever: at VRAMQ_MAX_ATTEMPTS it fails ``worker_lost``,
    refunded, listed in the operator's dead-letter view; the next worker goes on serving."""
    cluster = cluster_factory({**env, "VRAMQ_MAX_ATTEMPTS": "2", "VRAMQ_ADMIN_KEY": "ops"})
    cluster.start_api()
    cluster.announce_loading_worker(["tiny-flux"])  # admitted before the first worker is up
    job = cluster.post("/v1/jobs", json={"model": "tiny-flux", "input": SLOW}).json()
    for attempt in (1, 2):
        worker = cluster.start_worker()
        assert wait_running(cluster, job["id"], min_progress=0.02, timeout=90)["attempts"] == attempt
        worker.kill_group()
    cluster.start_worker()  # its reaper finds the second lapsed lease: that was the last try
    lost = cluster.wait_job(job["id"], timeout=60)
    assert lost["status"] == "failed" and lost["error"]["code"] == "worker_lost" and lost["attempts"] == 2, lost
    assert lost["usage"]["tokens_charged"] == 0
    stream = events.read(redis.Redis.from_url(env["VRAMQ_BROKER_URL"]), job["id"])
    assert [e for _id, e, _d in stream][-1] == "done"
    dead = cluster.get("/v1/admin/jobs?status=failed&code=worker_lost", headers={"Authorization": "Bearer ops"}).json()
    assert [j["id"] for j in dead["data"]] == [job["id"]]
    time.sleep(2 * 2)  # past another lease: nothing brings it back
    assert cluster.get(f"/v1/jobs/{job['id']}").json()["status"] == "failed"
    small = {"model": "tiny-flux", "input": {"prompt": "after", "steps": 2}}
    assert cluster.wait_job(cluster.post("/v1/jobs", json=small).json()["id"])["status"] == "succeeded"


def test_a_model_that_fails_to_load_fails_its_jobs_and_the_worker_goes_on(
    tmp_path, redis_url, models_dir, cluster_factory
):
    import shutil

    from vramq.gpu_workers.vram import estimate_entry
    from vramq.jobs.catalog import load_catalog

    broken = tmp_path / "broken-flux"
    shutil.copytree(models_dir / "tiny-flux", broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    with open(weights, "r+b") as f:  # the header (the estimate reads it) stays; the tensors are cut off
        f.truncate(header + 16)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        SLOW_CATALOG.format(weights=models_dir / "tiny-flux")
        + SLOW_CATALOG.format(weights=broken).replace('"tiny-flux"', '"broken-flux"')
    )
    entries = load_catalog(catalog, models_dir=models_dir)
    need = {m: estimate_entry(entries.get(m)).total_bytes for m in ("tiny-flux", "broken-flux")}
    cluster = cluster_factory(settings_env(tmp_path, redis_url=redis_url, models_dir=models_dir, catalog=catalog))
    cluster.start_api()
    # Room for one model at a time: tiny-flux loads at start, broken-flux on demand.
    worker = cluster._spawn(
        "worker",
        [
            "worker",
            "--cpu",
            "--models",
            "tiny-flux,broken-flux",
            "--vram-budget",
            f"{max(need.values()) // 1000 + 1}KB",
        ],
    )
    cluster._wait(
        worker, lambda: any(w["pid"] == worker.popen.pid and w["state"] == "ready" for w in cluster.workers()), 120
    )

    job = cluster.post("/v1/jobs", json={"model": "broken-flux", "input": {"prompt": "x", "steps": 2}}).json()
    failed = cluster.wait_job(job["id"], timeout=60)
    assert failed["status"] == "failed" and failed["error"]["code"] == "model_load_failed", failed
    assert "broken-flux" in failed["error"]["message"] and failed["usage"]["tokens_charged"] == 0
    (me,) = [w for w in cluster.workers() if w["pid"] == worker.popen.pid]
    assert list(me["failed_models"]) == ["broken-flux"] and me["state"] == "ready"
    time.sleep(1.1)  # the API's view of the workers is cached for a second
    refused = cluster.post("/v1/jobs", json={"model": "broken-flux", "input": {"prompt": "y", "steps": 2}})
    assert refused.status_code == 503 and refused.json()["code"] == "model_unavailable"
    ok = cluster.wait_job(
        cluster.post("/v1/jobs", json={"model": "tiny-flux", "input": {"prompt": "z", "steps": 2}}).json()["id"]
    )
    assert ok["status"] == "succeeded"
    assert worker.popen.poll() is None  # the same worker, still serving
