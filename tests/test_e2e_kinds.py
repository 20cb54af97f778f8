"""Text, video and speech end to end over HTTP, through the one shared worker process that
holds every tiny model resident (one vLLM engine for the session)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import requests

from tests.audio import data_uri, tone, vowels, wav_bytes
from tests.fixtures.http import assert_problem, read_sse, submit

pytestmark = pytest.mark.e2e


def test_one_worker_serves_every_kind(shared_cluster):
    workers = shared_cluster.workers()
    assert len(workers) == 1
    assert sorted(workers[0]["models"]) == ["echo", "tiny-flux", "tiny-qwen2", "tiny-video", "tiny-whisper"]
    kinds = {m["id"]: (m["kind"], m["available"]) for m in shared_cluster.get("/v1/models").json()["data"]}
    assert kinds == {
        "tiny-flux": ("image", True),
        "tiny-qwen2": ("text", True),
        "echo": ("text", True),
        "tiny-video": ("video", True),
        "tiny-whisper": ("speech", True),
    }


# --- text ------------------------------------------------------------------------------


def test_echo_answers_with_its_prompt_through_the_api_and_a_worker(shared_cluster):
    """The model that does no work (bench/queue_floor.py): a text job's output, streamed as a text job's."""
    a = submit(shared_cluster, "echo", {"prompt": "the queue alone", "max_tokens": 2})
    b = submit(
        shared_cluster,
        "echo",
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "echo me"}]},
    )
    done = shared_cluster.wait_job(a["id"])
    assert done["status"] == "succeeded", done
    assert done["output"] == {
        "text": "the queue",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    assert done["usage"]["batch_size"] == 1 and done["usage"]["gpu_seconds"] < 0.05
    done = shared_cluster.wait_job(b["id"])
    assert done["status"] == "succeeded", done
    assert done["output"]["text"] == "echo me" and done["output"]["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 2,
    }
    with requests.get(shared_cluster.url + f"/v1/jobs/{b['id']}/events", stream=True, timeout=60) as resp:
        events = read_sse(resp)
    assert [d["text"] for _i, e, d in events if e == "delta"] == ["echo me"]


def test_text_prompt_and_chat(shared_cluster):
    a = submit(shared_cluster, "tiny-qwen2", {"prompt": "Once upon a time", "max_tokens": 12, "seed": 3})
    b = submit(
        shared_cluster,
        "tiny-qwen2",
        {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
            "max_tokens": 9,
        },
    )
    for job, n in ((a, 12), (b, 9)):
        done = shared_cluster.wait_job(job["id"])
        assert done["status"] == "succeeded", done
        out = done["output"]
        assert out["finish_reason"] == "length" and out["usage"]["completion_tokens"] == n
        assert out["usage"]["prompt_tokens"] > 0 and isinstance(out["text"], str) and out["text"]
        assert done["usage"]["gpu_seconds"] > 0


def test_text_stream_delivers_the_final_text(shared_cluster):
    job = submit(shared_cluster, "tiny-qwen2", {"prompt": "Tell me a story", "max_tokens": 40})
    with requests.get(shared_cluster.url + f"/v1/jobs/{job['id']}/events", stream=True, timeout=120) as resp:
        events = read_sse(resp)
    deltas = [d["text"] for _i, e, d in events if e == "delta"]
    done = events[-1][2]
    assert events[-1][1] == "done" and done["status"] == "succeeded"
    assert len(deltas) > 1 and "".join(deltas) == done["output"]["text"]


def wait_running(cluster, job_id: str, min_progress: float = 0.0, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        job = cluster.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"] >= min_progress:
            return
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.02)


def streamed(cluster, job_id: str) -> list[tuple[str, dict]]:
    """The job's events as the worker wrote them: (event, data)."""
    import redis

    from vramq.jobs import events

    return [(e, d) for _i, e, d in events.read(redis.Redis.from_url(cluster.env["VRAMQ_BROKER_URL"]), job_id)]


def first_delta(cluster, job_id: str) -> None:
    """Follow the job's event stream until its first text delta (or its end)."""
    with requests.get(cluster.url + f"/v1/jobs/{job_id}/events", stream=True, timeout=120) as resp:
        for line in resp.iter_lines(decode_unicode=True):
            if line in ("event: delta", "event: done"):
                return


def test_text_cancel_mid_generation(shared_cluster, models_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models_dir / "tiny-qwen2")
    # The tiny model can write 2000 tokens in about a second on an idle machine, so a
    # cancel may lose the race against the end of the generation (the job then either
    # succeeded first, 409, or was canceled after its last token); try a few times.
    for _attempt in range(5):
        job = submit(shared_cluster, "tiny-qwen2", {"prompt": "Go on", "max_tokens": 2000})
        first_delta(shared_cluster, job["id"])  # cancel early in the generation, not whenever a poll sees it
        resp = shared_cluster.post(f"/v1/jobs/{job['id']}/cancel")
        if resp.status_code != 200:
            assert (
                resp.json()["code"] == "conflict"
                and shared_cluster.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
            )
            continue
        assert resp.json()["status"] == "canceled"
        final = shared_cluster.wait_job(job["id"])
        assert final["status"] == "canceled" and final["output"] is None
        # Aborted inside the engine: the token stream stopped short of 2000.
        time.sleep(0.5)  # the worker's event writer flushes what it has
        text = "".join(d["text"] for e, d in streamed(shared_cluster, job["id"]) if e == "delta")
        if len(tokenizer(text)["input_ids"]) < 1900:
            break
    else:
        pytest.fail("in 5 tries the engine never stopped a canceled generation short of its end")
    nxt = shared_cluster.wait_job(submit(shared_cluster, "tiny-qwen2", {"prompt": "next", "max_tokens": 4})["id"])
    assert nxt["status"] == "succeeded"


@pytest.mark.parametrize(
    "inp, loc, needle",
    [
        (
            {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
            ["input"],
            "exactly one of prompt or messages",
        ),
        ({}, ["input"], "exactly one of prompt or messages"),
        ({"prompt": "a", "max_tokens": 2001}, ["input", "max_tokens"], "limit max_tokens"),
        ({"prompt": "a", "temperature": 3}, ["input", "temperature"], "2"),
        ({"prompt": "a", "top_p": 0}, ["input", "top_p"], "greater than 0"),
        ({"messages": [{"role": "robot", "content": "b"}]}, ["input", "messages", "0", "role"], "system"),
        ({"messages": []}, ["input", "messages"], "at least 1"),
        ({"prompt": "a", "stop": "x"}, ["input", "stop"], "list"),
    ],
)
def test_text_bad_input(shared_cluster, inp, loc, needle):
    problem = assert_problem(
        shared_cluster.post("/v1/jobs", json={"model": "tiny-qwen2", "input": inp}), 422, "invalid_input"
    )
    msgs = " ".join(e["msg"] for e in problem["errors"] if [str(p) for p in e["loc"]] == loc)
    assert needle in msgs, problem


# --- video -----------------------------------------------------------------------------


def test_video_job_makes_an_mp4(shared_cluster):
    import av

    job = submit(
        shared_cluster,
        "tiny-video",
        {"prompt": "waves", "width": 64, "height": 48, "num_frames": 9, "fps": 12, "steps": 3},
    )
    done = shared_cluster.wait_job(job["id"], timeout=180)
    assert done["status"] == "succeeded", done
    video = done["output"]["video"]
    assert (video["content_type"], video["width"], video["height"], video["frames"], video["fps"]) == (
        "video/mp4",
        64,
        48,
        9,
        12,
    )
    data = requests.get(video["url"], timeout=10).content
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert stream.codec_context.name == "h264" and int(stream.average_rate) == 12
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (64, 48)


def test_video_cancel_mid_render(shared_cluster):
    # On a busy machine the cancel can still lose the race against the render's end (the
    # job succeeded first, 409, or its last steps ran before the worker saw the cancel);
    # try a few times. The render must stop between steps on at least one.
    for _attempt in range(3):
        job = submit(
            shared_cluster, "tiny-video", {"prompt": "long", "width": 64, "height": 64, "num_frames": 9, "steps": 200}
        )
        wait_running(shared_cluster, job["id"], min_progress=0.01)
        resp = shared_cluster.post(f"/v1/jobs/{job['id']}/cancel")
        if resp.status_code != 200:
            assert resp.json()["code"] == "conflict", resp.json()
            continue
        assert resp.json()["status"] == "canceled"
        final = shared_cluster.wait_job(job["id"])
        assert final["status"] == "canceled" and final["output"] is None
        time.sleep(0.5)  # the worker's event writer flushes what it has
        # The render stopped between steps: the progress the worker streamed never reached the end.
        progress = [d["progress"] for e, d in streamed(shared_cluster, job["id"]) if e == "progress"]
        assert progress, "no progress was streamed"
        if max(progress) < 0.95:
            break
    else:
        pytest.fail("in 3 tries the render never stopped between steps on a cancel")
    nxt = shared_cluster.wait_job(
        submit(shared_cluster, "tiny-video", {"prompt": "n", "width": 64, "height": 64, "num_frames": 5, "steps": 2})[
            "id"
        ]
    )
    assert nxt["status"] == "succeeded"


@pytest.mark.parametrize(
    "inp, loc",
    [
        ({"prompt": "x", "num_frames": 1000}, ["input", "num_frames"]),
        ({"prompt": "x", "width": 4096}, ["input", "width"]),
        ({"prompt": "x", "steps": 500}, ["input", "steps"]),
        ({"prompt": "x", "fps": 0}, ["input", "fps"]),
        ({"prompt": "x", "num_frames": 8}, ["input", "num_frames"]),
        ({"width": 64}, ["input", "prompt"]),
    ],
)
def test_video_bad_input(shared_cluster, inp, loc):
    assert_problem(
        shared_cluster.post("/v1/jobs", json={"model": "tiny-video", "input": inp}), 422, "invalid_input", loc
    )


# --- speech ----------------------------------------------------------------------------


def upload(cluster, data: bytes, name: str = "clip.wav") -> requests.Response:
    return cluster.post(
        "/v1/files", files={"file": (name, data, "application/octet-stream")}, data={"purpose": "audio"}
    )


def test_speech_from_an_uploaded_file_and_a_data_uri(shared_cluster):
    up = upload(shared_cluster, wav_bytes(vowels(3.0)))
    assert up.status_code == 201, up.text
    f = up.json()
    assert f["id"].startswith("file_") and abs(f["duration"] - 3.0) < 0.05
    a = submit(shared_cluster, "tiny-whisper", {"audio": f["id"], "language": "en"})
    b = submit(
        shared_cluster, "tiny-whisper", {"audio": data_uri(wav_bytes(tone(1.5))), "task": "translate", "language": "en"}
    )
    for job, seconds in ((a, 3.0), (b, 1.5)):
        done = shared_cluster.wait_job(job["id"], timeout=120)
        assert done["status"] == "succeeded", done
        out = done["output"]
        assert abs(out["duration"] - seconds) < 0.1 and out["language"] == "en" and isinstance(out["segments"], list)
        srt = requests.get(out["files"]["srt"], timeout=10)
        vtt = requests.get(out["files"]["vtt"], timeout=10)
        assert srt.status_code == 200 and vtt.status_code == 200 and vtt.text.startswith("WEBVTT")


@pytest.mark.parametrize(
    "audio, code",
    [
        ("file_doesnotexist", "invalid_input"),
        (data_uri(b"this is not audio at all"), "invalid_audio"),
        (data_uri(b""), "invalid_audio"),
        ("data:audio/wav;base64,@@@not-base64@@@", "invalid_input"),
        ("https://example.com/a.wav", "invalid_input"),
    ],
)
def test_speech_bad_audio_is_refused_at_submit(shared_cluster, audio, code):
    resp = shared_cluster.post("/v1/jobs", json={"model": "tiny-whisper", "input": {"audio": audio}})
    assert_problem(resp, 422, code, ["input", "audio"])


def test_speech_audio_past_the_limit(shared_cluster):
    # 601 s of silence at 8 kHz is about 9.6 MB: upload it, then submit against the 600 s limit.
    f = upload(shared_cluster, wav_bytes(tone(601.0, rate=8000) * 0, rate=8000)).json()
    problem = assert_problem(
        shared_cluster.post("/v1/jobs", json={"model": "tiny-whisper", "input": {"audio": f["id"]}}),
        422,
        "audio_too_long",
        ["input", "audio"],
    )
    assert "max_audio_seconds" in problem["detail"]


def test_corrupt_stored_audio_fails_the_job_and_the_worker_goes_on(shared_cluster):
    f = upload(shared_cluster, wav_bytes(tone(1.0))).json()
    # The stored object is damaged after upload (disk or bucket corruption).
    obj = Path(shared_cluster.env["VRAMQ_DATA_DIR"]) / "objects" / "files" / f["id"]
    assert obj.exists()
    obj.write_bytes(b"\x00" * 64)
    bad = shared_cluster.wait_job(submit(shared_cluster, "tiny-whisper", {"audio": f["id"]})["id"], timeout=120)
    assert bad["status"] == "failed" and bad["error"]["code"] == "invalid_audio", bad
    good = shared_cluster.wait_job(
        submit(shared_cluster, "tiny-whisper", {"audio": data_uri(wav_bytes(tone(1.0)))})["id"], timeout=120
    )
    assert good["status"] == "succeeded"


def test_upload_refuses_what_is_not_audio(shared_cluster):
    assert_problem(upload(shared_cluster, b"hello, plain text", "voice.wav"), 422, "invalid_audio", ["file"])
    assert json.loads(shared_cluster.get("/v1/models/tiny-whisper").text)["limits"]["max_audio_seconds"] == 600
