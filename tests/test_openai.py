"""The OpenAI-compatible API (``/openai/v1``) driven by the official ``openai`` client.

Against the shared cluster (a real ``vramq api`` and a worker with every tiny model) for
what runs jobs; in process (the real app behind the client's own WSGI transport) for the
errors that need settings of their own (allowances, rate limits). The tiny models have
random weights: the tests check shapes and that each answer is the job's own result
(the same text, the same token counts as ``/v1/jobs/<id>`` shows), never meaning.
"""

from __future__ import annotations

import platform

import httpx
import openai
import pytest

# The SDK names the machine in its headers: platform.processor() runs `uname -p` once
# and caches it. Run it here, at import, not inside an in-process test (which may not
# start processes, tests/conftest.py).
platform.processor()


@pytest.fixture(scope="module")
def key(shared_cluster) -> str:
    resp = shared_cluster.post("/v1/accounts", json={"name": "openai-sdk"})
    assert resp.status_code == 201, resp.text
    return resp.json()["api_key"]


@pytest.fixture(scope="module")
def client(shared_cluster, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{shared_cluster.url}/openai/v1", api_key=key, max_retries=0, timeout=120)


def native(cluster, key: str, job_id: str) -> dict:
    """The job as ``/v1/jobs/<id>`` shows it to its owner."""
    resp = cluster.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    return resp.json()


# --- models, chat, completions -----------------------------------------------------------


def test_models_lists_the_catalog(client, shared_cluster):
    models = client.models.list().data
    catalog = [m["id"] for m in shared_cluster.get("/v1/models").json()["data"]]
    assert [m.id for m in models] == catalog and {m.owned_by for m in models} == {"vramq"}
    assert client.models.retrieve("tiny-qwen2").id == "tiny-qwen2"


def test_chat_completion_is_the_jobs_result(client, shared_cluster, key):
    resp = client.chat.completions.create(
        model="tiny-qwen2",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_tokens=7,
        seed=5,
        temperature=0.7,
    )
    job = native(shared_cluster, key, resp.id)
    assert job["status"] == "succeeded" and job["input"]["max_tokens"] == 7 and job["input"]["seed"] == 5
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == job["output"]["text"]
    assert choice.finish_reason == job["output"]["finish_reason"] == "length"
    usage = job["output"]["usage"]
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (usage["prompt_tokens"], 7)
    assert resp.usage.total_tokens == usage["prompt_tokens"] + 7


def test_chat_stream_joins_to_the_jobs_text(client, shared_cluster, key):
    stream = client.chat.completions.create(
        model="tiny-qwen2",
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_completion_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    job = native(shared_cluster, key, chunks[0].id)
    assert {c.id for c in chunks} == {job["id"]} and len(chunks) > 3
    assert text == job["output"]["text"] and finish == [job["output"]["finish_reason"]]
    assert (
        chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == job["output"]["usage"]["completion_tokens"]
    )
    assert chunks[-1].usage.prompt_tokens == job["output"]["usage"]["prompt_tokens"]


def test_completions_plain_and_streamed(client, shared_cluster, key):
    resp = client.completions.create(model="tiny-qwen2", prompt="Once upon a time", max_tokens=6, stop=["\n\n\n"])
    job = native(shared_cluster, key, resp.id)
    assert resp.object == "text_completion" and resp.choices[0].text == job["output"]["text"]
    assert job["input"]["prompt"] == "Once upon a time" and job["input"]["stop"] == ["\n\n\n"]
    assert resp.usage.completion_tokens == job["output"]["usage"]["completion_tokens"]
    chunks = list(client.completions.create(model="echo", prompt="the queue alone", max_tokens=2, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "the queue"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_errors_are_the_sdks_exceptions(client, shared_cluster):
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])
    assert nf.value.code == "model_not_found" and nf.value.param == "model"
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(model="tiny-qwen2", messages=[{"role": "user", "content": "x"}], max_tokens=5000)
    assert br.value.param == "max_tokens" and "limit max_tokens" in br.value.message
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(model="tiny-qwen2", messages=[{"role": "tool", "content": "x"}])
    assert br.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(model="tiny-qwen2", messages=[{"role": "user", "content": "x"}], n=2)
    assert br.value.param == "n"
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(model="tiny-flux", messages=[{"role": "user", "content": "x"}])
    assert br.value.param == "model" and "image model" in br.value.message
    bad_key = openai.OpenAI(base_url=f"{shared_cluster.url}/openai/v1", api_key="vq_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as au:
        bad_key.models.list()
    assert au.value.body["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError):
        client.with_options().get("/no-such-route", cast_to=object)


# --- errors that need settings of their own: the app in process ---------------------------


def in_process(make_settings, **env) -> tuple[openai.OpenAI, object]:
    """The real app (real Redis, SQLite) behind the SDK's own transport, with an account."""
    from tests.fixtures.http import Harness
    from tests.fixtures.services import services_for

    settings, _ = make_settings(**env)
    h = Harness(services_for(settings))
    _account, api_key = h.account()
    http = httpx.Client(transport=httpx.WSGITransport(app=h.app))
    return openai.OpenAI(base_url="http://localhost/openai/v1", api_key=api_key, max_retries=0, http_client=http), h


def test_spent_tokens_and_rate_limits_are_rate_limit_errors(make_settings):
    sdk, _h = in_process(make_settings, free_daily_tokens=50, rate_limit_keyed=4)
    with pytest.raises(openai.RateLimitError) as quota:
        sdk.chat.completions.create(model="tiny-qwen2", messages=[{"role": "user", "content": "hi"}])
    assert quota.value.code == "insufficient_quota" and quota.value.body["type"] == "insufficient_quota"
    for _ in range(3):
        try:
            sdk.models.list()
        except openai.RateLimitError as exc:
            limited = exc
            break
    else:
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.models.list()
        limited = caught.value
    assert int(limited.response.headers["Retry-After"]) > 0 and limited.code == "rate_limited"
