"""Admission at submit: what a model's placement cannot serve is refused before it is queued.

- text: prompt tokens (the model's own tokenizer and chat template) + ``max_tokens`` past
  ``max_context`` -> 422 naming the limit; the API and the worker count alike;
- image resolution, video frames, audio length: 422 naming the catalog limit (the limits
  of each kind are also covered field by field in test_api_http and test_e2e_kinds);
- a model no live worker serves -> 503 ``model_unavailable`` with ``Retry-After``, and
  nothing is written or enqueued.
"""

from __future__ import annotations

import pytest

from tests.fixtures.http import assert_problem, submit
from vramq.jobs.prompts import PromptCounter

pytestmark = pytest.mark.e2e


def _chat(n_words: int) -> list[dict]:
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " ".join(f"w{i % 97}" for i in range(n_words))},
    ]


def test_text_past_the_context_is_refused_at_submit(shared_cluster, models_dir):
    prompt = " ".join(["word"] * 3000)
    tokens = PromptCounter(models_dir / "tiny-qwen2").count({"prompt": prompt})
    assert tokens > 2048
    resp = shared_cluster.post("/v1/jobs", json={"model": "tiny-qwen2", "input": {"prompt": prompt, "max_tokens": 8}})
    problem = assert_problem(resp, 422, "context_length_exceeded")
    assert problem["errors"][0]["loc"] == ["input", "prompt"]
    msg = problem["errors"][0]["msg"]
    assert f"{tokens} tokens" in msg and "max_context 2048" in msg and "tiny-qwen2" in msg


def test_api_and_worker_count_chat_tokens_alike(shared_cluster, models_dir):
    """At exactly the context the job is admitted and the engine runs it; one token more is refused."""
    messages = _chat(300)
    tokens = PromptCounter(models_dir / "tiny-qwen2").count({"messages": messages})
    room = 2048 - tokens
    assert 0 < room <= 2000
    over = shared_cluster.post(
        "/v1/jobs", json={"model": "tiny-qwen2", "input": {"messages": messages, "max_tokens": room + 1}}
    )
    problem = assert_problem(over, 422, "context_length_exceeded")
    assert problem["errors"][0]["loc"] == ["input", "messages"]
    fits = submit(shared_cluster, "tiny-qwen2", {"messages": messages, "max_tokens": room, "temperature": 0.0})
    done = shared_cluster.wait_job(fits["id"], timeout=180)
    # Had the worker counted one token more than the API, it would fail with context_length_exceeded.
    assert done["status"] == "succeeded", done
    assert done["output"]["usage"]["prompt_tokens"] == tokens


@pytest.mark.parametrize(
    "model, inp, field, limit",
    [
        ("tiny-flux", {"prompt": "x", "width": 1024}, "width", "max_width"),
        ("tiny-video", {"prompt": "x", "num_frames": 37}, "num_frames", "max_frames"),
        ("tiny-qwen2", {"prompt": "x", "max_tokens": 2001}, "max_tokens", "max_tokens"),
    ],
)
def test_each_kind_refuses_past_its_limits(shared_cluster, model, inp, field, limit):
    problem = assert_problem(shared_cluster.post("/v1/jobs", json={"model": model, "input": inp}), 422, "invalid_input")
    [err] = [e for e in problem["errors"] if e["loc"] == ["input", field]]
    assert limit in err["msg"], err


def test_model_without_a_live_worker_is_503_and_nothing_is_queued(make_settings):
    from sqlalchemy import func, select

    from tests.fixtures.services import services_for
    from vramq.api import create_app
    from vramq.jobs.queue import queue_name
    from vramq.jobs.schema import Job

    settings, _ = make_settings()
    services = services_for(settings)
    client = create_app(services=services).test_client()
    resp = client.post("/v1/jobs", json={"model": "tiny-flux", "input": {"prompt": "x"}})
    problem = resp.get_json()
    assert resp.status_code == 503 and resp.mimetype == "application/problem+json"
    assert problem["code"] == "model_unavailable" and "tiny-flux" in problem["detail"]
    assert int(resp.headers["Retry-After"]) > 0
    with services.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
    assert services.redis.llen(queue_name("tiny-flux")) == 0
    listed = {m["id"]: m for m in client.get("/v1/models").get_json()["data"]}
    assert listed["tiny-flux"]["available"] is False
    # Invalid input is still 422 first: the caller learns what to fix even while no worker runs.
    bad = client.post("/v1/jobs", json={"model": "tiny-flux", "input": {"prompt": "x", "width": 1024}})
    assert bad.status_code == 422 and bad.get_json()["code"] == "invalid_input"


def test_models_list_availability_and_vram(shared_cluster):
    models = {m["id"]: m for m in shared_cluster.get("/v1/models").json()["data"]}
    for m in ("tiny-flux", "tiny-qwen2", "tiny-whisper", "tiny-video"):
        assert models[m]["available"] is True
        assert models[m]["vram_gb"] is not None and models[m]["vram_gb"] > 0
        assert isinstance(models[m]["queue_depth"], int)
