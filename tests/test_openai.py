"""The OpenAI-compatible API (``/openai/v1``) driven by the official ``openai`` client.

Against the shared cluster (a real ``vramq api`` and a worker with every tiny model) for
what runs jobs; in process (the real app behind the client's own WSGI transport) for the
errors that need settings of their own (allowances, rate limits). The tiny models have
random weights: the tests check shapes and that each answer is the job's own result
(the same text, the same token counts as ``/v1/jobs/<id>`` shows), never meaning.
"""

from __future__ import annotations

import base64
import io
import json
import platform
import time
from datetime import timedelta

import httpx
import openai
import pytest
import requests
from PIL import Image

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
    with pytest.raises(openai.BadRequestError) as br:  # not a string: still a 400, never a 500
        client.chat.completions.create(model="tiny-qwen2", messages=[{"role": ["user"], "content": "x"}])
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
    limited = None
    for _ in range(5):  # 4 keyed requests a minute: one was the chat call
        try:
            sdk.models.list()
        except openai.RateLimitError as exc:
            limited = exc
            break
    assert limited is not None
    assert int(limited.response.headers["Retry-After"]) > 0 and limited.code == "rate_limited"


# --- images ----------------------------------------------------------------------------


def test_images_as_b64_json_and_as_links(client, shared_cluster, key):
    resp = client.images.generate(
        model="tiny-flux", prompt="a red fox", size="96x64", n=2, response_format="b64_json", extra_body={"seed": 7}
    )
    assert len(resp.data) == 2
    pngs = [base64.b64decode(d.b64_json) for d in resp.data]
    for png in pngs:
        pic = Image.open(io.BytesIO(png))
        assert pic.format == "PNG" and pic.size == (96, 64)
    linked = client.images.generate(model="tiny-flux", prompt="a red fox", size="96x64", extra_body={"seed": 8})
    assert len(linked.data) == 1 and linked.data[0].b64_json is None
    got = requests.get(linked.data[0].url, timeout=10)
    assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (96, 64)
    with pytest.raises(openai.BadRequestError) as br:
        client.images.generate(model="tiny-flux", prompt="x", size="4096x4096")
    assert br.value.param == "size" and "limit max_width" in br.value.message
    with pytest.raises(openai.BadRequestError) as br:
        client.images.generate(model="tiny-flux", prompt="x", n=9)
    assert br.value.param == "n" and "max_num_images" in br.value.message


# --- the Batch API ---------------------------------------------------------------------


def jsonl(lines: list[dict]) -> bytes:
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


def batch_of(client, endpoint: str, bodies: dict[str, dict], **kw):
    lines = [{"custom_id": cid, "method": "POST", "url": endpoint, "body": body} for cid, body in bodies.items()]
    f = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(jsonl(lines))
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h", **kw)


def settle(client, batch_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert batch.status in ("validating", "in_progress", "finalizing", "cancelling"), batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)


def lines_of(client, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_chat_batch_from_upload_to_output_file(client, shared_cluster, key):
    bodies = {
        f"q{i}": {
            "model": "tiny-qwen2",
            "messages": [{"role": "user", "content": f"Question {i}"}],
            "max_tokens": 3 + i,
        }
        for i in range(4)
    }
    bodies["e"] = {"model": "echo", "messages": [{"role": "user", "content": "echo me"}]}
    batch = batch_of(client, "/v1/chat/completions", bodies, metadata={"run": "nightly"})
    assert batch.status == "in_progress" and batch.request_counts.total == 5 and batch.metadata == {"run": "nightly"}
    native_batch = shared_cluster.get(f"/v1/batches/{batch.id}", headers={"Authorization": f"Bearer {key}"}).json()
    assert native_batch["priority"] == "low" and native_batch["counts"]["total"] == 5
    done = settle(client, batch.id)
    assert done.status == "completed" and done.error_file_id is None and done.completed_at >= done.created_at
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 0)
    out = lines_of(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(bodies)
    for line in out:
        assert line["error"] is None and line["response"]["status_code"] == 200
        parsed = openai.types.chat.ChatCompletion.model_validate(line["response"]["body"])
        job = native(shared_cluster, key, line["response"]["request_id"])
        assert parsed.choices[0].message.content == job["output"]["text"] and job["custom_id"] == line["custom_id"]
        assert parsed.usage.completion_tokens == job["output"]["usage"]["completion_tokens"]
    echo = next(line for line in out if line["custom_id"] == "e")["response"]["body"]
    assert echo["choices"][0]["message"]["content"] == "echo me"
    assert [b.id for b in client.batches.list(limit=1).data] == [batch.id]
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    assert client.files.delete(batch.input_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(batch.input_file_id)


def test_image_batch_as_b64_json_and_links(client, shared_cluster):
    base = {"model": "tiny-flux", "prompt": "a fox", "size": "64x48"}
    batch = batch_of(
        client,
        "/v1/images/generations",
        {"inline": {**base, "response_format": "b64_json", "n": 2}, "linked": {**base, "seed": 3}},
    )
    done = settle(client, batch.id, timeout=180)
    assert done.status == "completed" and done.request_counts.completed == 2
    out = {line["custom_id"]: line for line in lines_of(client, done.output_file_id)}
    assert set(out) == {"inline", "linked"}
    inline = openai.types.ImagesResponse.model_validate(out["inline"]["response"]["body"])
    pics = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in inline.data]
    assert [(p.format, p.size) for p in pics] == [("PNG", (64, 48))] * 2
    url = openai.types.ImagesResponse.model_validate(out["linked"]["response"]["body"]).data[0].url
    assert Image.open(io.BytesIO(requests.get(url, timeout=10).content)).size == (64, 48)


def test_batch_cancel_and_a_batch_that_fails_validation(client, shared_cluster):
    slow = {"model": "tiny-flux", "prompt": "slow", "size": "64x64"}
    batch = batch_of(client, "/v1/images/generations", {f"s{i}": {**slow, "seed": i} for i in range(10)})
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at is not None
    done = settle(client, batch.id)
    assert done.status == "cancelled" and done.request_counts.total == 10
    errors = lines_of(client, done.error_file_id) if done.error_file_id else []
    finished = lines_of(client, done.output_file_id) if done.output_file_id else []
    assert sorted(line["custom_id"] for line in errors + finished) == sorted(f"s{i}" for i in range(10))
    assert errors and {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
    bad = batch_of(
        client,
        "/v1/chat/completions",
        {
            "ok": {"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hi"}]},
            "big": {"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 99999},
            "img": {"model": "tiny-flux", "messages": [{"role": "user", "content": "hi"}]},
        },
    )
    assert bad.status == "failed" and bad.output_file_id is None
    errs = {(e.line, e.param) for e in bad.errors.data}
    assert (3, "body.model") in errs and any(line == 2 and "max_tokens" in param for line, param in errs), errs
    with pytest.raises(openai.BadRequestError) as br:
        client.batches.create(input_file_id=batch.input_file_id, endpoint="/v1/embeddings", completion_window="24h")
    assert br.value.param == "endpoint"
    with pytest.raises(openai.BadRequestError) as br:
        client.batches.create(input_file_id=batch.input_file_id, endpoint=[], completion_window="24h")
    assert br.value.param == "endpoint"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_doesnotexist")


# --- audio -----------------------------------------------------------------------------


def latest_job(cluster, key: str) -> dict:
    resp = cluster.get("/v1/jobs?limit=1", headers={"Authorization": f"Bearer {key}"})
    return resp.json()["data"][0]


def test_transcription_in_every_format_and_a_translation(client, shared_cluster, key):
    from tests.audio import vowels, wav_bytes

    wav = wav_bytes(vowels(3.0))
    seen = {}
    for fmt in ("json", "text", "srt", "vtt", "verbose_json"):
        seen[fmt] = client.audio.transcriptions.create(
            model="tiny-whisper", file=("clip.wav", wav), response_format=fmt, language="en"
        )
        job = latest_job(shared_cluster, key)
        assert job["kind"] == "speech" and job["status"] == "succeeded" and job["input"]["language"] == "en"
        out = job["output"]
        if fmt == "json":
            assert seen[fmt].text == out["text"]
        elif fmt == "text":
            assert seen[fmt].strip() == out["text"].strip()
        elif fmt in ("srt", "vtt"):
            assert seen[fmt] == requests.get(out["files"][fmt], timeout=10).text
        else:
            verbose = seen[fmt]
            assert verbose.text == out["text"] and abs(verbose.duration - 3.0) < 0.1 and verbose.language == "en"
            assert [(s.start, s.end, s.text) for s in verbose.segments] == [
                (s["start"], s["end"], s["text"]) for s in out["segments"]
            ]
    assert seen["vtt"].startswith("WEBVTT")
    translated = client.audio.translations.create(model="tiny-whisper", file=("clip.wav", wav))
    job = latest_job(shared_cluster, key)
    assert job["input"]["task"] == "translate" and translated.text == job["output"]["text"]
    with pytest.raises(openai.BadRequestError) as br:
        client.audio.transcriptions.create(
            model="tiny-whisper",
            file=("clip.wav", wav),
            timestamp_granularities=["word"],
            response_format="verbose_json",
        )
    assert br.value.param == "timestamp_granularities"
    with pytest.raises(openai.BadRequestError) as br:
        client.audio.transcriptions.create(model="tiny-whisper", file=("notes.txt", b"not audio at all"))
    assert br.value.param == "file" and br.value.code == "invalid_audio"


def test_a_batch_past_its_window_expires_and_ran_nothing_billed(make_settings):
    sdk, h = in_process(make_settings)  # a worker that is still loading: the jobs stay queued
    body = {"model": "tiny-flux", "prompt": "late", "size": "64x64"}
    batch = batch_of(sdk, "/v1/images/generations", {"a": body, "b": {**body, "n": 2}})
    assert sdk.batches.retrieve(batch.id).status == "in_progress"
    h.now += timedelta(hours=25)
    done = sdk.batches.retrieve(batch.id)
    assert done.status == "expired" and done.expired_at is not None and done.output_file_id is None
    assert (done.request_counts.total, done.request_counts.failed) == (2, 2)
    errors = lines_of(sdk, done.error_file_id)
    assert sorted(line["custom_id"] for line in errors) == ["a", "b"]
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    native_batch = h.call("GET", f"/v1/batches/{batch.id}", sdk.api_key).get_json()
    assert native_batch["counts"]["canceled"] == 2 and native_batch["usage"]["tokens_charged"] == 0


def test_closing_a_stream_cancels_its_job(client, shared_cluster, key):
    # The tiny model may write 2000 tokens before the close is noticed: try a few times.
    for _attempt in range(4):
        stream = client.chat.completions.create(
            model="tiny-qwen2", messages=[{"role": "user", "content": "Go on"}], max_tokens=2000, stream=True
        )
        first = next(iter(stream))
        stream.close()
        job_id = first.id
        deadline = time.monotonic() + 30
        while (job := native(shared_cluster, key, job_id))["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        if job["status"] == "canceled":
            break
        assert job["status"] == "succeeded", job
    assert job["status"] == "canceled" and job["output"] is None


def test_upload_and_batch_honour_idempotency_keys(client):
    line = {"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"model": "echo", "prompt": "hi"}}
    data = jsonl([line])
    once = client.files.create(file=("i.jsonl", data), purpose="batch", extra_headers={"Idempotency-Key": "up-1"})
    again = client.files.create(file=("i.jsonl", data), purpose="batch", extra_headers={"Idempotency-Key": "up-1"})
    assert once.id == again.id
    make = dict(input_file_id=once.id, endpoint="/v1/completions", completion_window="24h")
    a = client.batches.create(**make, extra_headers={"Idempotency-Key": "b-1"})
    b = client.batches.create(**make, extra_headers={"Idempotency-Key": "b-1"})
    assert a.id == b.id and settle(client, a.id).request_counts.completed == 1


def test_langchain_chat_model_over_the_queue(shared_cluster, key):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{shared_cluster.url}/openai/v1", api_key=key, model="tiny-qwen2", max_tokens=5, max_retries=0
    )
    answer = llm.invoke("Say something")
    job = latest_job(shared_cluster, key)
    assert (
        job["input"]["messages"] == [{"role": "user", "content": "Say something"}] and job["input"]["max_tokens"] == 5
    )
    assert answer.content == job["output"]["text"] and answer.usage_metadata["output_tokens"] == 5


def test_a_call_that_cannot_finish_in_time_is_503_and_an_oversized_upload_413(make_settings):
    # A worker that is still loading: the job waits in the queue past VRAMQ_STREAM_SECONDS.
    sdk, h = in_process(make_settings, stream_seconds=1, max_upload_mb=1)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as late:
        sdk.images.generate(model="tiny-flux", prompt="never runs", size="64x64")
    assert late.value.status_code == 503 and "VRAMQ_STREAM_SECONDS" in late.value.message
    assert time.monotonic() - started < 10
    job = h.call("GET", "/v1/jobs?limit=1", sdk.api_key).get_json()["data"][0]
    assert job["status"] == "canceled" and job["usage"]["tokens_charged"] == 0
    with pytest.raises(openai.APIStatusError) as big:
        sdk.files.create(file=("big.jsonl", b'{"a": 1}\n' * 200_000), purpose="batch")
    assert big.value.status_code == 413 and "VRAMQ_MAX_UPLOAD_MB" in big.value.message


def test_a_client_that_hangs_up_on_a_plain_call_cancels_its_job(tmp_path, redis_url, models_dir, cluster_factory):
    """A real ``vramq api`` (the app sees the client's socket through gunicorn) whose one
    worker is still loading: the job waits queued while the client gives up."""
    import socket

    from tests.conftest import settings_env

    cluster = cluster_factory(settings_env(tmp_path, redis_url=redis_url, models_dir=models_dir, admin_key="ops"))
    cluster.start_api()
    admin = {"Authorization": "Bearer ops"}
    cluster.announce_loading_worker(["tiny-flux"])
    body = json.dumps({"model": "tiny-flux", "prompt": "waits", "size": "64x64"}).encode()
    host, port = cluster.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        head = f"POST /openai/v1/images/generations HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 20
        while not (jobs := cluster.get("/v1/admin/jobs", headers=admin).json()["data"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert jobs[0]["status"] == "queued"  # the call is waiting on it
    deadline = time.monotonic() + 20
    while (job := cluster.get("/v1/admin/jobs", headers=admin).json()["data"][0])["status"] == "queued":
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["status"] == "canceled" and job["usage"]["tokens_charged"] == 0
