"""``vramq plan`` and ``vramq workers``: placement from the CLI, a supervised worker that is
killed and comes back with its jobs completed, a graceful stop, and on-demand loading with
least-recently-used eviction when a card's models do not fit at once. Real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import settings_env
from tests.fixtures.slow_image import SLOW, SLOW_CATALOG, wait_running

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "model-configs"


def vramq(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vramq.api.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_plan_json_places_what_fits_and_says_why_not(tmp_path):
    """Real architectures from their configs (no weights): 7B and 0.5B fit, 72B fits no 80 GB card."""
    catalog = tmp_path / "catalog.toml"
    entries = []
    for model_id, config in (
        ("qwen-7b", "qwen2.5-7b-instruct.json"),
        ("qwen-72b", "qwen2.5-72b-instruct.json"),
        ("qwen-05b", "qwen2.5-0.5b-instruct.json"),
    ):
        d = tmp_path / model_id
        d.mkdir()
        shutil.copy(CONFIGS / config, d / "config.json")
        entries.append(
            f'[[models]]\nid = "{model_id}"\nkind = "text"\nbackend = "vllm"\nweights = "{d}"\n'
            f"max_batch = 8\nlimits = {{ max_context = 8192 }}\n"
        )
    catalog.write_text("\n".join(entries))
    out = vramq("plan", "--cards", "80GB,24GB", "--catalog", str(catalog), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [c["card"] for c in doc["cards"]] == ["card0", "card1"]
    for card in doc["cards"]:
        resident = sum(m["vram_gb"] for m in card["models"] if m.get("resident", True))
        assert resident <= card["capacity_gb"] + 1e-6
        assert card["free_gb"] == pytest.approx(card["capacity_gb"] - resident, abs=0.02)
    placed = {m["id"] for c in doc["cards"] for m in c["models"]}
    assert {"qwen-7b", "qwen-05b"} <= placed and "qwen-72b" not in placed
    [unplaced] = doc["unplaced"]
    assert unplaced["id"] == "qwen-72b" and unplaced["vram_gb"] > 145
    assert "80" in unplaced["reason"]
    # The readable table says the same.
    table = vramq("plan", "--cards", "80GB,24GB", "--catalog", str(catalog))
    assert table.returncode == 0 and "qwen-72b" in table.stdout and "qwen-7b" in table.stdout


def test_vram_cli_known_answer():
    out = vramq("vram", str(CONFIGS / "llama-3-70b.json"), "--context", "200000", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc) >= {
        "params",
        "weights_gb",
        "kv_cache_gb",
        "activations_gb",
        "headroom_gb",
        "total_gb",
        "dtype",
        "kv_dtype",
    }
    assert doc["kv_cache_gb"] == pytest.approx(65.5, abs=0.1) and doc["kv_dtype"] == "fp16"
    assert doc["weights_gb"] == pytest.approx(141.1, abs=0.2)
    fp8 = json.loads(
        vramq("vram", str(CONFIGS / "llama-3-70b.json"), "--context", "200000", "--kv-dtype", "fp8", "--json").stdout
    )
    assert fp8["kv_cache_gb"] == pytest.approx(32.8, abs=0.1)
    bad = vramq("vram", str(CONFIGS / "llama-3-70b.json"), "--dtype", "fp7")
    assert bad.returncode != 0 and "fp7" in bad.stderr


def _ready_worker(cluster, not_pid: int | None = None, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in cluster.workers():
            if w["state"] == "ready" and w["pid"] != not_pid and _alive(w["pid"]):
                return w
        time.sleep(0.2)
    raise AssertionError(f"no ready worker; {cluster.workers()}\n" + "\n".join(p.tail() for p in cluster.procs))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_supervisor_restarts_a_killed_worker_and_its_job_completes(env, cluster_factory):
    cluster = cluster_factory(env)
    cluster.start_api()
    sup = cluster._spawn("workers", ["workers", "--cpu"])
    first = _ready_worker(cluster)
    job = cluster.post("/v1/jobs", json={"model": "tiny-flux", "input": {**SLOW, "steps": 300}}).json()
    wait_running(cluster, job["id"])
    os.kill(first["pid"], signal.SIGKILL)

    second = _ready_worker(cluster, not_pid=first["pid"])
    assert sup.popen.poll() is None and second["pid"] != first["pid"]
    done = cluster.wait_job(job["id"], timeout=180)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert "exited with code -9" in sup.tail(10**6)  # the supervisor said what happened

    # SIGTERM: the running job finishes (warm shutdown), then the supervisor exits 0.
    job2 = cluster.post("/v1/jobs", json={"model": "tiny-flux", "input": {**SLOW, "steps": 120}}).json()
    wait_running(cluster, job2["id"])
    sup.popen.send_signal(signal.SIGTERM)
    assert sup.popen.wait(timeout=120) == 0
    assert not _alive(second["pid"])
    assert cluster.get(f"/v1/jobs/{job2['id']}").json()["status"] == "succeeded"


TWO_MODELS = (
    SLOW_CATALOG
    + """
[[models]]
id = "tiny-video"
kind = "video"
backend = "diffusers"
weights = "{video}"
dtype = "float32"
max_batch = 1
limits = {{ max_width = 256, max_height = 256, min_side = 32, max_frames = 33, frame_step = 4 }}
defaults = {{ width = 32, height = 32, num_frames = 5, steps = 2 }}
"""
)


def test_models_past_the_budget_load_on_demand_evicting_the_least_recently_used(
    tmp_path, redis_url, models_dir, cluster_factory
):
    from vramq.gpu_workers.vram import estimate_entry
    from vramq.jobs.catalog import load_catalog

    catalog = tmp_path / "catalog.toml"
    catalog.write_text(TWO_MODELS.format(weights=models_dir / "tiny-flux", video=models_dir / "tiny-video"))
    need = {e.id: estimate_entry(e).total_bytes for e in load_catalog(catalog)}
    budget_mb = -(-max(need.values()) // 10**6) + 1  # room for either model, never both
    budget = budget_mb * 10**6
    assert budget < sum(need.values()), need
    cluster = cluster_factory(settings_env(tmp_path, redis_url=redis_url, models_dir=models_dir, catalog=catalog))
    cluster.start_api()
    proc = cluster._spawn(
        "worker", ["worker", "--cpu", "--models", "tiny-flux,tiny-video", "--vram-budget", f"{budget_mb}MB"]
    )
    w = _ready_worker(cluster)
    assert w["resident"] == ["tiny-flux"] and w["vram"]["budget_bytes"] == budget

    def run(model: str) -> dict:
        inp = {"prompt": "x", "steps": 2} if model == "tiny-flux" else {"prompt": "x"}
        job = cluster.post("/v1/jobs", json={"model": model, "input": inp}).json()
        done = cluster.wait_job(job["id"], timeout=180)
        assert done["status"] == "succeeded", done
        return done["usage"]

    hot = run("tiny-flux")
    cold = run("tiny-video")  # evicts tiny-flux
    back = run("tiny-flux")  # evicts tiny-video
    again = run("tiny-flux")
    assert hot["cold_start_seconds"] == 0 and again["cold_start_seconds"] == 0
    assert cold["cold_start_seconds"] > 0 and back["cold_start_seconds"] > 0
    time.sleep(6)  # a heartbeat with the latest counts
    w = next(x for x in cluster.workers() if x["pid"] == proc.popen.pid)
    assert w["resident"] == ["tiny-flux"]
    assert w["models_stats"]["tiny-flux"] == {**w["models_stats"]["tiny-flux"], "loads": 2, "evictions": 1}
    assert w["models_stats"]["tiny-video"]["loads"] == 1 and w["models_stats"]["tiny-video"]["evictions"] == 1
    metrics = cluster.get("/metrics").text
    assert 'vramq_model_evictions_total{card="cpu"' in metrics
    assert "vramq_card_vram_estimated_bytes" in metrics and "vramq_card_vram_measured_bytes" in metrics
    line = next(
        ln for ln in metrics.splitlines() if ln.startswith("vramq_model_loads_total") and 'model="tiny-flux"' in ln
    )
    assert float(line.rsplit(" ", 1)[1]) == 2
