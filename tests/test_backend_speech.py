"""The faster-whisper speech backend against a real tiny Whisper built for the module.

The model has random weights, so its text is noise; durations, segments, batching,
subtitles and the failure codes are what these tests hold it to.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faster_whisper")
pytest.importorskip("transformers")

from tests.audio import SR, mp3_bytes, tone, vowels, wav_bytes
from vramq.gpu_workers.backends import WorkItem, backend_class
from vramq.gpu_workers.backends.whisper_speech import (
    format_timestamp,
    merge_regions,
    to_srt,
    to_vtt,
)
from vramq.gpu_workers.tiny import MARKER
from vramq.gpu_workers.tiny_speech import make_tiny_whisper
from vramq.jobs.catalog import ModelEntry
from vramq.jobs.errors import JobCanceled, JobError

# --- the model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_whisper_dir(tmp_path_factory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("models") / "tiny-whisper")


def entry_for(weights: Path, **limits) -> ModelEntry:
    return ModelEntry(
        id="tiny-whisper",
        kind="speech",
        backend="faster_whisper",
        weights=weights,
        dtype="float32",
        max_batch=4,
        limits={"max_audio_seconds": 120, **limits},
    )


@pytest.fixture(scope="module")
def backend(tiny_whisper_dir):
    entry = entry_for(tiny_whisper_dir)
    b = backend_class(entry)(entry, "cpu", vad_filter=False)
    b.load()
    yield b
    b.unload()


@pytest.fixture(scope="module")
def vad_backend(tiny_whisper_dir):
    entry = entry_for(tiny_whisper_dir)
    b = backend_class(entry)(entry, "cpu")  # VAD on: the default
    b.load()
    yield b
    b.unload()


def item(audio: bytes, *, language: str | None = "en", task: str = "transcribe", progress=None, canceled=False):
    return WorkItem(
        job_id="job",
        input={"audio": "file_x", "language": language, "task": task},
        on_progress=progress.append if progress is not None else (lambda f: None),
        is_canceled=lambda: canceled,
        attachments={"audio": audio},
    )


SRT_CUE = re.compile(r"^(\d+)\n(\d\d:\d\d:\d\d,\d\d\d) --> (\d\d:\d\d:\d\d,\d\d\d)\n(.+)$", re.DOTALL)
VTT_CUE = re.compile(r"^(\d\d:\d\d:\d\d\.\d\d\d) --> (\d\d:\d\d:\d\d\.\d\d\d)\n(.+)$", re.DOTALL)


def check_subtitles(result) -> None:
    """The SRT and VTT artifacts parse and hold one cue per segment with text."""
    arts = {a.name: a for a in result.artifacts}
    assert arts["transcript.srt"].content_type == "application/x-subrip"
    assert arts["transcript.vtt"].content_type == "text/vtt"
    cued = [s for s in result.output["segments"] if s["text"]]
    srt = arts["transcript.srt"].data.decode()
    blocks = [b for b in srt.split("\n\n") if b.strip()]
    assert len(blocks) == len(cued)
    for n, (block, seg) in enumerate(zip(blocks, cued, strict=True), 1):
        m = SRT_CUE.match(block.strip("\n"))
        assert m, block
        assert int(m[1]) == n
        assert (m[2], m[3]) == (format_timestamp(seg["start"]), format_timestamp(seg["end"]))
    vtt = arts["transcript.vtt"].data.decode()
    assert vtt.startswith("WEBVTT\n\n") or vtt == "WEBVTT\n"
    vblocks = [b for b in vtt.split("\n\n")[1:] if b.strip()]
    assert len(vblocks) == len(cued)
    for block in vblocks:
        assert VTT_CUE.match(block.strip("\n")), block


# --- the tiny model itself -----------------------------------------------------------


def test_tiny_whisper_directory_is_complete_and_idempotent(tiny_whisper_dir):
    for name in ("model.bin", "config.json", "vocabulary.json", "tokenizer.json", "preprocessor_config.json", MARKER):
        assert (tiny_whisper_dir / name).is_file(), name
    stamp = (tiny_whisper_dir / "model.bin").stat().st_mtime_ns
    assert make_tiny_whisper(tiny_whisper_dir) == tiny_whisper_dir
    assert (tiny_whisper_dir / "model.bin").stat().st_mtime_ns == stamp
    pre = json.loads((tiny_whisper_dir / "preprocessor_config.json").read_text())
    assert (pre["feature_size"], pre["sampling_rate"], pre["chunk_length"]) == (80, 16000, 30)


def test_tiny_whisper_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_tiny_whisper(tmp_path / "x")


def test_tokenizer_has_whispers_layout(tiny_whisper_dir):
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(tiny_whisper_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == 51866  # 50257 text tokens + 1609 specials, as large-v3
    expected = {
        "<|endoftext|>": 50257,
        "<|startoftranscript|>": 50258,
        "<|en|>": 50259,
        "<|yue|>": 50358,
        "<|translate|>": 50359,
        "<|transcribe|>": 50360,
        "<|nospeech|>": 50363,
        "<|notimestamps|>": 50364,
        "<|0.00|>": 50365,
        "<|30.00|>": 51865,
    }
    assert {t: tok.token_to_id(t) for t in expected} == expected
    text = " Hello world, ça va? 日本語"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    marker = json.loads((tiny_whisper_dir / MARKER).read_text())
    if marker["vocabulary"] == "whisper-multilingual":
        # Known ids of the genuine vocabulary (openai/whisper multilingual.tiktoken).
        assert tok.encode("Hello world", add_special_tokens=False).ids == [15947, 1002]


def test_local_vocabulary_builds_the_same_layout(tmp_path):
    import tokenizers
    from faster_whisper import WhisperModel

    d = make_tiny_whisper(tmp_path / "tiny-whisper-local", vocabulary="local")
    assert json.loads((d / MARKER).read_text())["vocabulary"] == "local-bpe"
    tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() == 51866
    assert tok.token_to_id("<|transcribe|>") == 50360
    assert tok.decode(tok.encode(" the quick brown fox", add_special_tokens=False).ids) == " the quick brown fox"
    model = WhisperModel(str(d), device="cpu", compute_type="float32")
    assert model.model.is_multilingual and model.model.n_mels == 80


# --- transcription -------------------------------------------------------------------


@pytest.mark.e2e
def test_batch_of_two_gives_durations_segments_and_subtitles(backend):
    progress_a, progress_b = [], []
    results = backend.run_batch(
        [item(wav_bytes(tone(2.0)), progress=progress_a), item(wav_bytes(tone(5.0)), progress=progress_b)]
    )
    for result, seconds, progress in zip(results, (2.0, 5.0), (progress_a, progress_b), strict=True):
        out = result.output
        assert out["duration"] == pytest.approx(seconds, abs=0.1)
        assert out["language"] == "en"
        assert out["files"] == {"srt": {"$artifact": "transcript.srt"}, "vtt": {"$artifact": "transcript.vtt"}}
        # Without VAD, one 30 s window: one segment over the whole file.
        assert [(s["start"], s["end"]) for s in out["segments"]] == [(0.0, pytest.approx(seconds, abs=0.1))]
        assert isinstance(out["text"], str) and isinstance(out["segments"][0]["text"], str)
        check_subtitles(result)
        assert progress == sorted(progress) and progress[-1] == 1.0


@pytest.mark.e2e
def test_long_audio_is_cut_into_30_second_segments(backend):
    [result] = backend.run_batch([item(wav_bytes(tone(65.0)))])
    spans = [(s["start"], s["end"]) for s in result.output["segments"]]
    assert spans == [(0.0, 30.0), (30.0, 60.0), (60.0, pytest.approx(65.0, abs=0.01))]
    check_subtitles(result)


@pytest.mark.e2e
def test_items_share_forward_passes(backend):
    """Chunks of different jobs go through the model together, not one job after another."""
    batches = []
    forward = backend.pipeline.forward

    def counting(features, *args, **kwargs):
        batches.append(len(features))
        return forward(features, *args, **kwargs)

    backend.pipeline.forward = counting
    try:
        results = backend.run_batch([item(wav_bytes(tone(s))) for s in (3.0, 4.0, 35.0)])
    finally:
        del backend.pipeline.forward
    assert batches == [4]  # 1 + 1 + 2 chunks in one pass
    assert [len(r.output["segments"]) for r in results] == [1, 1, 2]


@pytest.mark.e2e
def test_language_is_detected_when_not_given(backend):
    [result] = backend.run_batch([item(wav_bytes(tone(2.0)), language=None)])
    assert result.output["language"] in backend.model.supported_languages


@pytest.mark.e2e
def test_translate_task(backend):
    assert backend.batch_key({"task": "translate", "language": "de"}) != backend.batch_key(
        {"task": "transcribe", "language": "de"}
    )
    [result] = backend.run_batch([item(wav_bytes(tone(2.0)), language="de", task="translate")])
    assert result.output["language"] == "de"
    assert result.output["duration"] == pytest.approx(2.0, abs=0.1)
    check_subtitles(result)


@pytest.mark.e2e
def test_unknown_language_fails_the_item(backend):
    [result] = backend.run_batch([item(wav_bytes(tone(1.0)), language="xx")])
    assert isinstance(result, JobError) and result.code == "invalid_input"


@pytest.mark.e2e
def test_vad_skips_a_tone_and_finds_voiced_sound(vad_backend):
    def silence(seconds):
        return np.zeros(int(seconds * SR), dtype=np.float32)

    # (Silero scores this synthetic sound lower after 10 s or more of digital silence,
    # so the voiced stretches start early; real speech does not need that care.)
    early = np.concatenate([silence(1), vowels(1.5), silence(2.5)])
    later = np.concatenate([silence(5), vowels(3.0), silence(1)])
    quiet, spoken_early, spoken_later = vad_backend.run_batch(
        [item(wav_bytes(tone(3.0))), item(wav_bytes(early)), item(wav_bytes(later))]
    )
    assert quiet.output["segments"] == [] and quiet.output["text"] == ""
    assert quiet.output["duration"] == pytest.approx(3.0, abs=0.1)
    check_subtitles(quiet)
    # One chunk each, around the voiced stretch, in the job's own time.
    [seg] = spoken_early.output["segments"]
    assert 0.5 <= seg["start"] <= 1.2 and 2.0 <= seg["end"] <= 3.0, seg
    [seg] = spoken_later.output["segments"]
    assert 4.5 <= seg["start"] <= 5.2 and 6.0 <= seg["end"] <= 8.5, seg
    assert spoken_later.output["duration"] == pytest.approx(9.0, abs=0.1)
    check_subtitles(spoken_later)


# --- bad input -----------------------------------------------------------------------


@pytest.mark.e2e
def test_not_audio_and_empty_fail_only_their_own_item(backend):
    bad, empty, good = backend.run_batch(
        [item(b"this is a text file, not audio\n" * 20), item(b""), item(wav_bytes(tone(1.0)))]
    )
    assert isinstance(bad, JobError) and bad.code == "invalid_audio"
    assert isinstance(empty, JobError) and empty.code == "invalid_audio"
    assert good.output["duration"] == pytest.approx(1.0, abs=0.1)


@pytest.mark.e2e
def test_truncated_files(backend):
    wav, mp3 = wav_bytes(tone(4.0)), mp3_bytes(tone(4.0))
    # Cut in half: FFmpeg decodes the part that is there (no error), so the job
    # transcribes what arrived and reports that shorter duration.
    half_wav, half_mp3 = backend.run_batch([item(wav[: len(wav) // 2]), item(mp3[: len(mp3) // 2])])
    assert half_wav.output["duration"] == pytest.approx(2.0, abs=0.1)
    assert 1.0 < half_mp3.output["duration"] < 3.0
    # Only the first bytes of the header: nothing decodes.
    head_wav, head_mp3 = backend.run_batch([item(wav[:40]), item(mp3[:40])])
    assert isinstance(head_wav, JobError) and head_wav.code == "invalid_audio"
    assert isinstance(head_mp3, JobError) and head_mp3.code == "invalid_audio"


@pytest.mark.e2e
def test_audio_longer_than_the_limit_fails(tiny_whisper_dir, backend):
    entry = entry_for(tiny_whisper_dir, max_audio_seconds=3)
    short_limit = backend_class(entry)(entry, "cpu", vad_filter=False)
    short_limit.model, short_limit.pipeline = backend.model, backend.pipeline  # same weights, other limit
    long, ok = short_limit.run_batch([item(wav_bytes(tone(5.0))), item(wav_bytes(tone(2.0)))])
    assert isinstance(long, JobError) and long.code == "audio_too_long"
    assert "max_audio_seconds=3" in str(long)
    assert ok.output["duration"] == pytest.approx(2.0, abs=0.1)


@pytest.mark.e2e
def test_canceled_item(backend):
    canceled, ok = backend.run_batch([item(wav_bytes(tone(1.0)), canceled=True), item(wav_bytes(tone(1.0)))])
    assert isinstance(canceled, JobCanceled)
    assert ok.output["duration"] == pytest.approx(1.0, abs=0.1)


# --- subtitle formatting (pure) ------------------------------------------------------

SEGMENTS = [
    {"start": 0.0, "end": 2.5, "text": " Hello there."},
    {"start": 2.5, "end": 3661.0049, "text": ""},  # no text: no cue
    {"start": 3661.0049, "end": 3725.9996, "text": "a < b & c > d\n\nsecond line"},
]


def test_format_timestamp():
    assert format_timestamp(0) == "00:00:00,000"
    assert format_timestamp(3661.0049) == "01:01:01,005"
    assert format_timestamp(59.9996) == "00:01:00,000"
    assert format_timestamp(-1) == "00:00:00,000"
    assert format_timestamp(36000.5, ".") == "10:00:00.500"


def test_srt_known_answer():
    assert to_srt(SEGMENTS) == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n"
        "\n"
        "2\n01:01:01,005 --> 01:02:06,000\na < b & c > d\nsecond line\n"
    )
    assert to_srt([]) == ""


def test_vtt_known_answer():
    assert to_vtt(SEGMENTS) == (
        "WEBVTT\n"
        "\n"
        "00:00:00.000 --> 00:00:02.500\nHello there.\n"
        "\n"
        "01:01:01.005 --> 01:02:06.000\na &lt; b &amp; c &gt; d\nsecond line\n"
    )
    assert to_vtt([]) == "WEBVTT\n"


def test_merge_regions():
    assert merge_regions([], 30) == []
    assert merge_regions([(0, 5), (10, 20), (25, 30), (31, 40)], 30) == [(0, 30), (31, 40)]
    assert merge_regions([(0, 70)], 30) == [(0, 30), (30, 60), (60, 70)]
    assert merge_regions([(0, 10), (12, 75)], 30) == [(0, 10), (12, 42), (42, 72), (72, 75)]
