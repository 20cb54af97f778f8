"""``/v1/files`` through the Flask test client (real Redis, SQLite or PostgreSQL, local
store), and the audio checks behind it: probing, data URIs, resolving, submit-time limits."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")

from tests.audio import data_uri, encode, tone, wav_bytes
from tests.fixtures.services import services_for
from vramq.api import create_app
from vramq.jobs.audio import parse_data_uri, probe_audio
from vramq.jobs.catalog import ModelEntry
from vramq.jobs.errors import InputError, NotFound
from vramq.jobs.files import check_audio_input, resolve_audio, store_file


def encoded(codec: str, fmt: str, seconds: float = 2.0, rate: int = 44100) -> bytes:
    """``seconds`` of tone encoded by FFmpeg (PyAV) as ``codec`` in container ``fmt``."""
    return encode(tone(seconds, rate), codec, fmt, rate, frame_size=1024)


def speech_entry(tmp_path: Path, **limits) -> ModelEntry:
    return ModelEntry(id="tiny-whisper", kind="speech", backend="faster_whisper", weights=tmp_path, limits=limits)


def assert_problem(resp, status: int, code: str, loc: list | None = None) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/problem+json"
    body = resp.get_json()
    assert body["status"] == status and body["code"] == code, body
    if loc is not None:
        assert loc in [e["loc"] for e in body["errors"]], body
    return body


@pytest.fixture
def make_app(make_settings):
    def build(**settings_kw):
        settings, _ = make_settings(**settings_kw)
        services = services_for(settings)
        return create_app(services=services), services

    return build


@pytest.fixture
def app_services(make_app):
    return make_app()


@pytest.fixture
def client(app_services):
    return app_services[0].test_client()


def upload(client, data: bytes, filename: str = "a.wav", purpose: str | None = "audio", **extra):
    form = {"file": (io.BytesIO(data), filename)}
    if purpose is not None:
        form["purpose"] = purpose
    return client.post("/v1/files", data={**form, **extra}, content_type="multipart/form-data")


# --- the HTTP API --------------------------------------------------------------------


def test_upload_wav_then_read_it(client, app_services):
    data = wav_bytes(tone(2.0))
    resp = upload(client, data, "meeting.wav")
    assert resp.status_code == 201, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["id"].startswith("file_") and body["object"] == "file"
    assert body["bytes"] == len(data)
    assert body["content_type"] == "audio/wav"
    assert body["purpose"] == "audio" and body["filename"] == "meeting.wav"
    assert body["duration"] == pytest.approx(2.0, abs=0.01)
    assert body["created_at"].endswith("Z")
    assert resp.headers["Location"] == f"/v1/files/{body['id']}"
    again = client.get(f"/v1/files/{body['id']}")
    assert again.status_code == 200 and again.get_json() == body
    _, services = app_services
    assert services.store.get(f"files/{body['id']}") == data


def test_content_is_sniffed_not_taken_from_the_name(client):
    mp3 = upload(client, encoded("mp3", "mp3"), "voice-note.wav")  # an MP3 named .wav
    assert mp3.status_code == 201
    assert mp3.get_json()["content_type"] == "audio/mpeg"
    assert mp3.get_json()["duration"] == pytest.approx(2.0, abs=0.1)
    text = upload(client, b"just some text, honestly\n" * 50, "song.wav")
    body = assert_problem(text, 422, "invalid_audio", ["file"])
    assert "not an audio file" in body["detail"]
    png = upload(client, b"\x89PNG\r\n\x1a\n" + bytes(200), "song.mp3")
    assert "no audio stream" in assert_problem(png, 422, "invalid_audio", ["file"])["detail"]
    assert "empty" in assert_problem(upload(client, b"", "empty.wav"), 422, "invalid_audio")["detail"]


def test_upload_over_the_limit_is_413(make_app):
    app, _ = make_app(max_upload_mb=1)
    client = app.test_client()
    limit = 1024 * 1024
    # Over the app-wide 256 KB body cap but under the upload cap: accepted.
    ok = upload(client, wav_bytes(np.zeros(limit // 2 - 100, dtype=np.float32)), "big.wav")
    assert ok.status_code == 201, ok.get_data(as_text=True)
    assert ok.get_json()["bytes"] > 256 * 1024
    too_big = upload(client, wav_bytes(np.zeros(limit // 2 + 100, dtype=np.float32)), "huge.wav")
    body = assert_problem(too_big, 413, "payload_too_large")
    assert str(limit) in body["detail"] and "VRAMQ_MAX_UPLOAD_MB" in body["detail"]
    # Far past it: refused from Content-Length, before the body is parsed.
    assert_problem(upload(client, bytes(3 * limit), "huge.wav"), 413, "payload_too_large")


def test_missing_fields_and_bad_purpose_are_422(client):
    no_file = client.post("/v1/files", data={"purpose": "audio"}, content_type="multipart/form-data")
    assert_problem(no_file, 422, "invalid_input", ["file"])
    assert_problem(upload(client, wav_bytes(tone(1.0)), purpose=None), 422, "invalid_input", ["purpose"])
    body = assert_problem(upload(client, wav_bytes(tone(1.0)), purpose="music"), 422, "invalid_input", ["purpose"])
    assert "audio, batch" in body["errors"][0]["msg"]
    json_body = client.post("/v1/files", json={"file": "x", "purpose": "audio"})
    assert_problem(json_body, 415, "unsupported_media_type")


def test_batch_files_must_be_jsonl(client):
    lines = b'{"custom_id": "a", "model": "tiny-flux", "input": {"prompt": "x"}}\n\n{"custom_id": "b"}\n'
    ok = upload(client, lines, "jobs.jsonl", purpose="batch")
    assert ok.status_code == 201
    assert ok.get_json()["content_type"] == "application/jsonl" and ok.get_json()["duration"] is None
    bad = upload(client, b'{"a": 1}\nnot json\n', "jobs.jsonl", purpose="batch")
    assert "line 2" in assert_problem(bad, 422, "invalid_input", ["file"])["detail"]
    assert_problem(upload(client, b"[1, 2]\n", "jobs.jsonl", purpose="batch"), 422, "invalid_input", ["file"])
    assert_problem(upload(client, b"\xff\xfe\x00", "jobs.jsonl", purpose="batch"), 422, "invalid_input", ["file"])


def test_unknown_file_is_404(client):
    assert_problem(client.get("/v1/files/file_nope"), 404, "not_found")


def test_filename_keeps_only_the_last_path_segment(client):
    resp = upload(client, wav_bytes(tone(0.5)), "../../etc/pass\x00wd.wav")
    assert resp.status_code == 201
    assert resp.get_json()["filename"] == "passwd.wav"


# --- probing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "codec, fmt, content_type",
    [
        ("mp3", "mp3", "audio/mpeg"),
        ("flac", "flac", "audio/flac"),
        ("aac", "adts", "audio/aac"),
        ("aac", "mp4", "audio/mp4"),
    ],
)
def test_probe_audio_formats(codec, fmt, content_type):
    info = probe_audio(encoded(codec, fmt))
    assert info.content_type == content_type
    assert info.duration_s == pytest.approx(2.0, abs=0.1)
    assert info.sample_rate == 44100 and info.channels == 1


def test_probe_audio_truncated_and_corrupt():
    wav, mp3, flac = wav_bytes(tone(4.0)), encoded("mp3", "mp3", 4.0), encoded("flac", "flac", 4.0)
    # FFmpeg reads a cut WAV or MP3 to where it ends, without an error: the duration
    # is what is there (the MP3's header would still claim 4 s).
    assert probe_audio(wav[: len(wav) // 2]).duration_s == pytest.approx(2.0, abs=0.05)
    assert 1.0 < probe_audio(mp3[: len(mp3) // 2]).duration_s < 3.0
    # A cut FLAC fails in its last frame: refused as truncated.
    with pytest.raises(InputError, match="truncated or corrupt") as exc:
        probe_audio(flac[: len(flac) // 2])
    assert exc.value.code == "invalid_audio"
    # Only the start of the header: no format recognised.
    with pytest.raises(InputError, match="not an audio file"):
        probe_audio(wav[:40])


# --- data URIs -------------------------------------------------------------------------


def test_parse_data_uri_round_trip():
    data = wav_bytes(tone(0.5))
    assert parse_data_uri(data_uri(data), 10**6) == data
    # Line breaks inside the base64 (as some encoders wrap it) are allowed.
    wrapped = base64.encodebytes(data).decode()
    assert parse_data_uri(f"data:audio/wav;base64,{wrapped}", 10**6) == data
    assert parse_data_uri(data_uri(data, "audio/mpeg; codecs=mp3").replace("; ", ";"), 10**6) == data


@pytest.mark.parametrize(
    "uri, code, needle",
    [
        ("data:audio/wav;base64", "invalid_input", "not a data URI"),
        ("file_abc", "invalid_input", "not a data URI"),
        ("data:text/plain;base64,aGVsbG8=", "invalid_input", "audio/"),
        ("data:audio/wav,RIFF....", "invalid_input", "base64-encoded"),
        ("data:audio/wav;base64,@@@@", "invalid_input", "invalid base64"),
        ("data:audio/wav;base64,abcde", "invalid_input", "invalid base64"),
        ("data:audio/wav;base64,", "invalid_audio", "no data"),
        ("data:audio/wav;base64," + "A" * 2000, "payload_too_large", "limit of 1000 bytes"),
    ],
)
def test_parse_data_uri_errors(uri, code, needle):
    with pytest.raises(InputError) as exc:
        parse_data_uri(uri, 1000)
    assert exc.value.code == code
    assert needle in str(exc.value)
    assert exc.value.errors[0]["loc"] == ["input", "audio"]


# --- resolving and submit-time checks ------------------------------------------------


def test_resolve_audio_round_trip(app_services):
    _, services = app_services
    data = wav_bytes(tone(1.5))
    row = store_file(services, data, "clip.wav", "audio", caller="anon:127.0.0.1")
    assert row.sha256 == hashlib.sha256(data).hexdigest() and row.duration_s == pytest.approx(1.5, abs=0.01)
    assert resolve_audio(services, row.id) == data
    assert resolve_audio(services, data_uri(data)) == data
    with pytest.raises(NotFound):
        resolve_audio(services, "file_missing")
    with pytest.raises(InputError, match="invalid base64"):
        resolve_audio(services, "data:audio/wav;base64,###")
    # The row without its object (store emptied behind our back): NotFound, not a crash.
    services.store.delete_prefix("files")
    with pytest.raises(NotFound):
        resolve_audio(services, row.id)


def test_check_audio_input(app_services, tmp_path):
    _, services = app_services
    entry = speech_entry(tmp_path, max_audio_seconds=3, max_audio_bytes=200_000)
    short = store_file(services, wav_bytes(tone(2.0)), "short.wav", "audio", caller=None)
    assert check_audio_input(services, entry, {"audio": short.id}) == pytest.approx(2.0, abs=0.01)
    assert check_audio_input(services, entry, {"audio": data_uri(wav_bytes(tone(1.0)))}) == pytest.approx(1.0, abs=0.01)

    def refused(ref: str) -> InputError:
        with pytest.raises(InputError) as exc:
            check_audio_input(services, entry, {"audio": ref})
        assert exc.value.errors[0]["loc"] == ["input", "audio"]
        return exc.value

    long = store_file(services, wav_bytes(tone(5.0)), "long.wav", "audio", caller=None)
    err = refused(long.id)
    assert err.code == "audio_too_long" and "max_audio_seconds=3" in str(err)
    assert refused(data_uri(wav_bytes(tone(4.0)))).code == "audio_too_long"
    assert refused(data_uri(wav_bytes(tone(10.0)))).code == "payload_too_large"  # 320 KB > 200 KB
    assert "no file" in str(refused("file_nope"))
    batch = store_file(services, b'{"a": 1}\n', "b.jsonl", "batch", caller=None)
    assert "purpose 'batch'" in str(refused(batch.id))
    assert refused(data_uri(b"not audio at all" * 10)).code == "invalid_audio"


def test_files_table_on_postgresql(make_settings, pg_url):
    settings, _ = make_settings(database_url=pg_url)
    services = services_for(settings)
    data = wav_bytes(tone(1.0))
    row = store_file(services, data, "pg.wav", "audio", caller=None)
    assert resolve_audio(services, row.id) == data
    with services.engine.connect() as conn:
        indexes = conn.exec_driver_sql("SELECT indexname FROM pg_indexes WHERE tablename = 'files'").scalars().all()
    assert "ix_files_created" in indexes
    services.engine.dispose()


def test_upload_with_idempotency_key(client):
    wav = wav_bytes(tone(1.0))

    def send(data, key):
        return client.post(
            "/v1/files",
            data={"purpose": "audio", "file": (io.BytesIO(data), "a.wav")},
            headers={"Idempotency-Key": key},
            content_type="multipart/form-data",
        )

    first, again = send(wav, "up-1"), send(wav, "up-1")
    assert first.status_code == 201 and again.status_code == 200
    assert first.get_json()["id"] == again.get_json()["id"]
    assert_problem(send(wav_bytes(tone(2.0)), "up-1"), 409, "conflict")
    assert send(wav, "up-2").get_json()["id"] != first.get_json()["id"]
