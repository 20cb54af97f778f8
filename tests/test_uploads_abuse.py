"""Uploads as a disk filler and a CPU sink (the issue's reproductions, kept as regressions).

1. A caller without an API key may upload smaller files (VRAMQ_ANONYMOUS_MAX_UPLOAD_MB)
   than an account (VRAMQ_MAX_UPLOAD_MB), judged from Content-Length before a byte is read.
2. A caller's live uploads are held to a quota (VRAMQ_ANONYMOUS_UPLOAD_QUOTA_MB per
   anonymous network, VRAMQ_UPLOAD_QUOTA_MB per account): 413 ``upload_quota_exceeded``,
   also under concurrent uploads by the same caller (PostgreSQL and SQLite).
3. The audio probe is bounded: a declared duration past the limit is refused before
   decoding, a file whose header lies is cut at the limit, and decoding has a CPU budget.
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

pytest.importorskip("av")

from sqlalchemy import delete

from tests.audio import encode, tone, wav_bytes
from tests.fixtures.http import CountingStream, assert_problem, build_harness, count
from vramq.jobs.audio import probe_audio
from vramq.jobs.errors import InputError
from vramq.jobs.files import File, UploadQuotaExceeded, store_file

MB = 1024 * 1024
HOURS_3 = 3 * 3600


@pytest.fixture
def edge(tmp_path, redis_url):
    """The app in process on SQLite, with settings ``edge(max_upload_mb=4, …)`` (as in tests/test_hostile.py)."""
    return lambda **extra: build_harness(tmp_path, redis_url, **extra)


@pytest.fixture(params=["postgresql", "sqlite"])
def edge_db(request, tmp_path, redis_url):
    """Like ``edge``, once on PostgreSQL and once on SQLite."""

    def build(**extra):
        url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
        return build_harness(tmp_path, redis_url, url, **extra)

    return build


def flac_silence(seconds: float, rate: int = 8000) -> bytes:
    """``seconds`` of mono silence as FLAC, encoded a minute at a time (3 h: ~2 MB, ~1.5 s)."""
    import av

    buf, chunk = io.BytesIO(), rate * 60
    zeros = np.zeros((1, chunk), dtype=np.int16)
    with av.open(buf, "w", format="flac") as out:
        stream = out.add_stream("flac", rate=rate)
        stream.layout = "mono"
        total, pts = int(seconds * rate), 0
        while pts < total:
            n = min(chunk, total - pts)
            frame = av.AudioFrame.from_ndarray(zeros[:, :n], format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, pts
            for packet in stream.encode(frame):
                out.mux(packet)
            pts += n
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def lie_about_length(flac: bytes, samples: int) -> bytes:
    """The FLAC with its STREAMINFO total-samples field (36 bits) set to ``samples``."""
    assert flac[:4] == b"fLaC"
    data = bytearray(flac)
    field = int.from_bytes(data[18:26], "big")
    field = (field & ~((1 << 36) - 1)) | samples
    data[18:26] = field.to_bytes(8, "big")
    return bytes(data)


@pytest.fixture(scope="module")
def long_flac() -> bytes:
    return flac_silence(HOURS_3)


def upload(h, data: bytes, key: str | None = None, name: str = "a.flac", addr: str = "203.0.113.7", purpose="audio"):
    return h.call(
        "POST",
        "/v1/files",
        key,
        data={"purpose": purpose, "file": (io.BytesIO(data), name)},
        content_type="multipart/form-data",
        environ_base={"REMOTE_ADDR": addr},
    )


def cpu_of(fn):
    """``(result, CPU seconds of this thread)``: the test client runs the app in this thread."""
    t0 = time.thread_time()
    result = fn()
    return result, time.thread_time() - t0


def jsonl(size: int) -> bytes:
    return b'{"p": "' + b"x" * (size - 10) + b'"}\n'


# --- 1. per-file limit by caller --------------------------------------------------------


def test_an_anonymous_upload_is_capped_smaller_from_content_length_before_reading(edge):
    h = edge(max_upload_mb=4, anonymous_max_upload_mb=1, max_batch_body_mb=4)
    _, key = h.account()
    body = CountingStream(3 * MB)
    resp = h.call(
        "POST", "/v1/files", input_stream=body, content_length=body.size, content_type="multipart/form-data; boundary=x"
    )
    problem = assert_problem(resp, 413, "payload_too_large", ["file"])
    assert body.read_bytes == 0
    assert "VRAMQ_ANONYMOUS_MAX_UPLOAD_MB" in problem["detail"] and problem["limit_bytes"] == MB
    assert "VRAMQ_MAX_UPLOAD_MB" in problem["detail"]  # says how to get more
    two_mb = wav_bytes(np.zeros(MB, dtype=np.float32))  # 2 MB of 16-bit samples
    assert_problem(upload(h, two_mb, name="a.wav"), 413, "payload_too_large")
    ok = upload(h, two_mb, key, name="a.wav")
    assert ok.status_code == 201, ok.get_json()
    keyed = h.call(
        "POST",
        "/v1/files",
        key,
        input_stream=CountingStream(5 * MB),
        content_length=5 * MB,
        content_type="multipart/form-data; boundary=x",
    )
    assert "VRAMQ_MAX_UPLOAD_MB" in assert_problem(keyed, 413, "payload_too_large")["detail"]
    assert count(h, File) == 1


# --- 2. storage quota per caller --------------------------------------------------------


def test_anonymous_uploads_are_held_to_a_quota_per_network(edge):
    h = edge(anonymous_upload_quota_mb=1, upload_quota_mb=2, max_batch_body_mb=4)
    _, key = h.account()
    part = jsonl(400 * 1024)
    assert [upload(h, part, key, "b.jsonl", purpose="batch").status_code for _ in range(3)] == [201] * 3
    codes = [upload(h, wav_bytes(tone(12.0)), name="a.wav").status_code for _ in range(3)]  # ~384 KB each
    assert codes == [201, 201, 413]
    problem = assert_problem(upload(h, wav_bytes(tone(12.0)), name="a.wav"), 413, "upload_quota_exceeded", ["file"])
    assert problem["quota_bytes"] == MB and problem["setting"] == "VRAMQ_ANONYMOUS_UPLOAD_QUOTA_MB"
    assert 0 < problem["used_bytes"] <= MB and str(MB) in problem["detail"]
    assert "VRAMQ_ANONYMOUS_UPLOAD_QUOTA_MB" in problem["detail"]
    # The same /64 is the same caller; another network is another.
    assert upload(h, wav_bytes(tone(1.0)), addr="2001:db8:5::1").status_code == 201
    assert upload(h, wav_bytes(tone(12.0)), addr="2001:db8:5::2").status_code == 201
    assert upload(h, wav_bytes(tone(12.0)), addr="2001:db8:5::3").status_code == 201
    assert upload(h, wav_bytes(tone(12.0)), addr="2001:db8:5:0:1::9").status_code == 413
    assert upload(h, wav_bytes(tone(12.0)), addr="203.0.113.8").status_code == 201
    # The account's quota is its own, larger one.
    keyed = assert_problem(upload(h, jsonl(900 * 1024), key, "b.jsonl", purpose="batch"), 413, "upload_quota_exceeded")
    assert keyed["setting"] == "VRAMQ_UPLOAD_QUOTA_MB" and keyed["quota_bytes"] == 2 * MB
    # Nothing refused was stored: rows and objects.
    with h.services.sessions() as s:
        rows = s.query(File).all()
    assert len(rows) == 3 + 2 + 3 + 1
    # Deleted uploads (the retention sweeper) free the quota.
    with h.services.sessions.begin() as s:
        s.execute(delete(File).where(File.caller == "anon:203.0.113.7"))
    assert upload(h, wav_bytes(tone(12.0)), name="a.wav").status_code == 201


def test_the_quota_holds_under_concurrent_uploads_by_one_caller(edge_db):
    h = edge_db()
    services, quota, size = h.services, (MB, "VRAMQ_ANONYMOUS_UPLOAD_QUOTA_MB"), 300 * 1024
    data = jsonl(size)
    start, results = threading.Barrier(8), []

    def one():
        start.wait()
        try:
            results.append(store_file(services, data, "b.jsonl", "batch", "anon:198.51.100.1", quota=quota))
        except UploadQuotaExceeded as exc:
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stored = [r for r in results if isinstance(r, File)]
    assert len(results) == 8 and len(stored) == MB // size == 3
    assert all(
        isinstance(r, UploadQuotaExceeded) and r.code == "upload_quota_exceeded" for r in results if r not in stored
    )
    assert set(services.store.list("files/")) == {r.key for r in stored}  # the refused ones' bytes are gone


# --- 3. the audio probe is bounded ------------------------------------------------------


def test_a_long_silent_flac_is_refused_from_its_header_without_decoding(edge, long_flac):
    assert len(long_flac) < 3 * MB  # 3 hours of silence: small enough for every upload limit
    h = edge()  # the tiny catalog: tiny-whisper takes 600 s, so uploads up to 660 s
    resp, cpu = cpu_of(lambda: upload(h, long_flac))
    problem = assert_problem(resp, 422, "audio_too_long", ["file"])
    assert "10800 s" in problem["detail"] and "660 s" in problem["detail"]
    assert "VRAMQ_MAX_AUDIO_SECONDS" in problem["detail"]
    assert cpu < 0.5, cpu  # decoding it whole took ~0.85 s of CPU (a 20-hour file ~5 s)
    assert count(h, File) == 0
    _, direct = cpu_of(lambda: pytest.raises(InputError, probe_audio, long_flac, max_seconds=660))
    assert direct < 0.1, direct


def test_a_header_that_lies_short_is_cut_at_the_limit(edge, long_flac):
    liar = lie_about_length(long_flac, 80_000)  # claims 10 s
    h = edge()
    resp, cpu = cpu_of(lambda: upload(h, liar))
    problem = assert_problem(resp, 422, "audio_too_long", ["file"])
    assert "decodes to more than" in problem["detail"] and "660 s" in problem["detail"]
    assert cpu < 0.5, cpu
    # Unbounded, the probe measures it (the header is not believed).
    assert probe_audio(liar).duration_s == pytest.approx(HOURS_3)


def test_decoding_has_a_cpu_budget(edge, long_flac):
    liar = lie_about_length(long_flac, 80_000)
    h = edge(max_audio_seconds=20_000, audio_probe_cpu_seconds=0.05)
    resp, cpu = cpu_of(lambda: upload(h, liar))
    problem = assert_problem(resp, 422, "invalid_audio", ["file"])
    assert "VRAMQ_AUDIO_PROBE_CPU_SECONDS" in problem["detail"] and "0.05 s" in problem["detail"]
    assert cpu < 0.5, cpu


def test_short_audio_is_still_accepted_and_measured_and_non_audio_refused(edge):
    h = edge(max_audio_seconds=30)
    flac = upload(h, flac_silence(20.0))
    assert flac.status_code == 201, flac.get_json()
    assert flac.get_json()["duration"] == pytest.approx(20.0, abs=0.01)
    assert flac.get_json()["content_type"] == "audio/flac"
    mp3 = upload(h, encode(tone(3.0, 44100), "mp3", "mp3", 44100), name="a.mp3")
    assert mp3.status_code == 201 and mp3.get_json()["duration"] == pytest.approx(3.0, abs=0.1)
    assert_problem(upload(h, flac_silence(31.0)), 422, "audio_too_long", ["file"])
    assert_problem(upload(h, b"not audio, honestly\n" * 50), 422, "invalid_audio", ["file"])
    assert_problem(upload(h, b"\x89PNG\r\n\x1a\n" + bytes(200)), 422, "invalid_audio", ["file"])


def test_a_data_uri_is_probed_against_the_models_limit(edge, long_flac):
    import base64

    h = edge(max_body_kb=4096)
    uri = "data:audio/flac;base64," + base64.b64encode(lie_about_length(long_flac, 80_000)).decode()
    resp, cpu = cpu_of(lambda: h.call("POST", "/v1/jobs", json={"model": "tiny-whisper", "input": {"audio": uri}}))
    problem = assert_problem(resp, 422, "audio_too_long", ["input", "audio"])
    assert "max_audio_seconds=600" in problem["detail"]
    assert cpu < 0.5, cpu
