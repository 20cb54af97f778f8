"""End to end over real HTTP: a real ``vramq api`` and ``vramq worker`` on real Redis,
SQLite or PostgreSQL, and a local directory or S3 (moto server)."""

from __future__ import annotations

import io

import pytest
import requests
from PIL import Image

from tests.conftest import settings_env

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["sqlite+local", "postgres+s3", "sqlite+s3", "postgres+local"])
def cluster(request, tmp_path, redis_url, models_dir, cluster_factory):
    db, store = request.param.split("+")
    kw = {}
    if db == "postgres":
        kw["database_url"] = request.getfixturevalue("pg_url")
    if store == "s3":
        s3 = request.getfixturevalue("s3_store")
        kw["storage_url"] = f"s3://{s3.bucket}/outputs"
        kw["s3_endpoint_url"] = request.getfixturevalue("moto_s3_endpoint")
    c = cluster_factory(settings_env(tmp_path, redis_url=redis_url, models_dir=models_dir, **kw))
    c.start_api()
    c.start_worker(models="tiny-flux")
    return c


def test_image_job_end_to_end(cluster):
    resp = cluster.post(
        "/v1/jobs",
        json={
            "model": "tiny-flux",
            "input": {"prompt": "a red fox", "width": 96, "height": 64, "num_images": 2, "seed": 7},
        },
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["status"] == "queued" and job["id"].startswith("job_")
    assert resp.headers["Location"].endswith(f"/v1/jobs/{job['id']}")
    done = cluster.wait_job(job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["error"] is None
    assert done["usage"]["gpu_seconds"] > 0
    images = done["output"]["images"]
    assert [i["seed"] for i in images] == [7, 8]
    for img in images:
        data = requests.get(img["url"], timeout=10)
        assert data.status_code == 200
        pic = Image.open(io.BytesIO(data.content))
        assert pic.format == "PNG" and pic.size == (96, 64)
