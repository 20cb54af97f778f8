"""``vramq up`` on embedded defaults (nothing configured but a data dir) and the CLI around it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.fixtures.procs import ROOT, free_port

pytestmark = pytest.mark.e2e


def test_up_on_embedded_defaults_runs_a_job_and_stops_cleanly(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    # Only a data dir: SQLite, embedded Redis, local objects, the tiny catalog, and no
    # models yet, so `up` must build them itself (the real small models, fetched from the
    # package index, have their own tests: tests/test_small_models.py).
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMQ_")}
    env.update({"VRAMQ_DATA_DIR": str(data), "VRAMQ_SMALL_MODELS": "0", "PYTHONUNBUFFERED": "1"})
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "vramq.api.cli", "up", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            try:
                if requests.get(url + "/v1/models", timeout=1).json()["data"][0]["available"]:
                    break
            except (requests.RequestException, KeyError, IndexError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(1.0)  # under the anonymous rate limit (120 a minute)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "vramq.api.cli",
                "submit",
                "tiny-flux",
                "prompt=a small boat",
                "width=64",
                "height=64",
                "--wait",
                "--url",
                url,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        job = json.loads(out.stdout)
        assert job["status"] == "succeeded"
        assert requests.get(job["output"]["images"][0]["url"], timeout=5).content[:8] == b"\x89PNG\r\n\x1a\n"
        assert (data / "vramq.db").exists() and (data / "redis" / "port").exists()
        assert (data / "models" / "tiny-flux" / "model_index.json").exists()
        redis_port = int((data / "redis" / "port").read_text())
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0, (tmp_path / "up.log").read_text()
    # Everything it started is gone: the API port and the embedded Redis are closed.
    for p in (port, redis_port):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{p}/", timeout=1)


def test_worker_refuses_unknown_model(tmp_path, redis_url, models_dir):
    from tests.conftest import settings_env

    env = {**os.environ, **settings_env(tmp_path, redis_url=redis_url, models_dir=models_dir)}
    out = subprocess.run(
        [sys.executable, "-m", "vramq.api.cli", "worker", "--cpu", "--models", "nope"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "unknown models ['nope']" in out.stderr


def test_worker_needs_card_or_cpu():
    out = subprocess.run(
        [sys.executable, "-m", "vramq.api.cli", "worker"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "--card N or --cpu" in out.stderr


def test_demo_runs_the_bulk_render_end_to_end(tmp_path, models_dir, small_models_dir):
    """The embedded default, real small models included: the chat answers and the
    transcript matches what was said; the images and the video are the tiny pipelines'."""
    # Every model already built: the tiny ones of the session and the cached small ones.
    both = tmp_path / "models"
    both.mkdir()
    for built in (*models_dir.iterdir(), *small_models_dir.iterdir()):
        if not built.name.startswith("."):
            (both / built.name).symlink_to(built)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMQ_")}
    env.update({"VRAMQ_DATA_DIR": str(tmp_path / "data"), "VRAMQ_MODELS_DIR": str(both)})
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vramq.api.cli",
            "demo",
            "--images",
            "3",
            "--port",
            str(free_port()),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all jobs succeeded" in out.stdout
    said = " ".join(out.stdout.split())  # rich wraps long lines
    assert "chat (smollm2-135m)" in said and "Paris" in said.split("chat reply", 1)[1], out.stdout
    assert "transcript" in said and "random-weight pipelines" in said
    if shutil.which("espeak-ng") or os.environ.get("CI"):
        from tests.audio import word_error_rate
        from vramq.api.demo import SPOKEN

        assert "spoken (whisper-tiny-en)" in said
        [(_, transcript)] = re.findall(r"""transcript \(job_[^)]*\): (['"])(.*?)\1""", said)
        assert word_error_rate(SPOKEN, transcript) <= 0.35, transcript
    out_dir = tmp_path / "out"
    pngs = sorted(out_dir.glob("job_*.png"))
    assert len(pngs) == 3 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    [mp4] = out_dir.glob("job_*.mp4")
    assert mp4.read_bytes()[4:8] == b"ftyp"
    [vtt] = out_dir.glob("job_*.vtt")
    assert vtt.read_text().startswith("WEBVTT")
    assert "chat reply" in out.stdout and "transcript" in out.stdout
    assert "completed, 3/3 succeeded; results manifest (3 lines)" in out.stdout  # the images went as one batch
    for kind in ("image", "video", "speech", "text"):
        assert f" {kind} " in out.stdout  # a row of the summary table
