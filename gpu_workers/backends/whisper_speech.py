"""Speech-to-text with faster-whisper (Whisper converted to CTranslate2).

One ``WhisperModel`` stays resident with a ``BatchedInferencePipeline`` over it. The
pipeline batches the ≤30 s chunks of ONE audio array through the encoder and decoder;
it has no call that takes several files. Batching across jobs therefore goes through
that same call: the jobs' audio is laid end to end in one array (whole seconds apart)
and each job's chunks are passed as ``clip_timestamps``, so the chunks of every job in
the batch share the model's batches (``chunk_batch_size`` chunks per forward pass).
Every segment that comes back is mapped to its job by its start time.

Per job, before that: the audio is decoded with ``faster_whisper.decode_audio``
(PyAV/FFmpeg, resampled to 16 kHz mono); Silero VAD finds the speech (``vad_filter``)
and the speech regions are merged into chunks of at most 30 s; without VAD the audio
is cut into 30 s windows. A job without a language gets one detected on its own
speech, and jobs are then grouped by language (one pipeline call per language; the
batch key already holds the task).

Segments are Whisper's chunk-level segments (``without_timestamps``, the batched
pipeline's default), so their boundaries come from the VAD, never from a model's
guessed timestamps. ``SRT`` and ``WebVTT`` files are written from them by the pure
functions at the bottom.

faster-whisper (and with it ctranslate2 and av) is imported when a method needs it,
never at import time.
"""

from __future__ import annotations

import bisect
import gc
import io
import json
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from vramq.jobs.errors import JobCanceled, JobError, MissingExtra

from .base import Artifact, Backend, ItemResult, WorkItem

if TYPE_CHECKING:
    from faster_whisper import BatchedInferencePipeline, WhisperModel

SAMPLE_RATE = 16000
"""Whisper's input rate; every file is resampled to it."""
MAX_NEW_TOKENS = 444
"""Whisper's 448 decoder positions less the 4-token prompt (start, language, task, no timestamps)."""


def _faster_whisper():
    """Import faster_whisper, or say which extra installs it."""
    try:
        import faster_whisper
    except ImportError:
        raise MissingExtra("faster_whisper", "speech") from None
    return faster_whisper


class WhisperSpeechBackend(Backend):
    """A CTranslate2 Whisper model loaded from ``entry.weights`` (a converted directory)."""

    #: Chunks (of up to 30 s each, from any job of the batch) per encoder/decoder pass.
    chunk_batch_size = 16
    beam_size = 5

    def __init__(self, entry, device: str, *, vad_filter: bool = True):
        super().__init__(entry, device)
        self.vad_filter = vad_filter
        """Cut at speech found by Silero VAD (faster-whisper's batched default); False:
        fixed 30 s windows, everything transcribed (tones and noise included)."""
        self.model: WhisperModel | None = None
        self.pipeline: BatchedInferencePipeline | None = None
        self.max_new_tokens: int | None = None
        """Decoding bound from the model's generation_config.json (the tiny model ships
        one); None: Whisper's own 448-token context bounds it."""

    # --- lifecycle -----------------------------------------------------------------

    def load(self) -> None:
        fw = _faster_whisper()
        device, index = (str(self.device).split(":") + ["0"])[:2]
        on_gpu = device == "cuda"
        compute_type = self.entry.dtype if on_gpu else "float32"
        self.model = fw.WhisperModel(
            str(self.entry.weights),
            device=device,
            device_index=int(index),
            compute_type=compute_type,
            local_files_only=True,
        )
        self.pipeline = fw.BatchedInferencePipeline(self.model)
        gen = self.entry.weights / "generation_config.json"
        if gen.is_file():
            bound = json.loads(gen.read_text()).get("max_new_tokens")
            # faster-whisper refuses prompt + new tokens past Whisper's 448 positions.
            self.max_new_tokens = min(int(bound), MAX_NEW_TOKENS) if bound else None

    def unload(self) -> None:
        self.pipeline = None
        self.model = None
        gc.collect()

    def _loaded(self) -> tuple[WhisperModel, BatchedInferencePipeline]:
        """The model and its batched pipeline; RuntimeError before ``load`` (or after ``unload``)."""
        if self.model is None or self.pipeline is None:
            raise RuntimeError("load() must run before the first batch")
        return self.model, self.pipeline

    # --- batching ------------------------------------------------------------------

    def batch_key(self, inp: dict[str, Any]) -> Hashable:
        return (inp["task"], inp.get("language"))

    # --- running -------------------------------------------------------------------

    def run_batch(self, items: list[WorkItem]) -> list[ItemResult | BaseException]:
        if self.pipeline is None:
            raise RuntimeError("load() must run before the first batch")
        if len({self.batch_key(item.input) for item in items}) != 1:
            raise ValueError("items of one call must have equal batch keys")
        results: list[ItemResult | BaseException | None] = [None] * len(items)
        jobs: list[_Job] = []
        for i, item in enumerate(items):
            if item.is_canceled():
                results[i] = JobCanceled("canceled")
                continue
            try:
                jobs.append(self._prepare(i, item))
            except JobError as exc:
                results[i] = exc

        by_language: dict[str, list[_Job]] = {}
        for job in jobs:
            by_language.setdefault(job.language, []).append(job)
        task = items[0].input["task"]
        for language, group in by_language.items():
            self._transcribe(group, language, task)

        for job in jobs:
            if job.canceled or job.item.is_canceled():
                results[job.index] = JobCanceled("canceled")
            else:
                job.item.on_progress(1.0)
                results[job.index] = job.result()
        return results  # type: ignore[return-value]  # every item's slot was filled above

    def _prepare(self, index: int, item: WorkItem) -> _Job:
        """Decode, check the length, find the chunks and the language of one job."""
        fw = _faster_whisper()
        data = item.attachments.get("audio")
        if not data:
            raise JobError("the audio is empty", code="invalid_audio")
        try:
            audio = fw.decode_audio(io.BytesIO(data), sampling_rate=SAMPLE_RATE)
        except Exception as exc:
            raise JobError(f"the audio cannot be decoded: {exc}", code="invalid_audio") from None
        if audio.size == 0:
            raise JobError("the audio holds no decodable samples", code="invalid_audio")
        duration = audio.size / SAMPLE_RATE
        limit = self.entry.limit.max_audio_seconds
        if duration > limit:
            raise JobError(
                f"the audio is {duration:.1f} s long, over the limit max_audio_seconds={limit:g}"
                f" of model {self.entry.id}",
                code="audio_too_long",
            )
        clips = self._clips(audio)
        model, _ = self._loaded()
        language = item.input.get("language")
        if language is None and not model.model.is_multilingual:
            language = "en"  # an English-only model (``*.en``) has nothing to detect
        if language is None:
            sample = audio if not clips else _concat_clips(audio, clips, self._chunk_samples)
            language, _, _ = model.detect_language(audio=sample)
        elif language not in model.supported_languages:
            raise JobError(f"language {language!r} is not one model {self.entry.id} knows", code="invalid_input")
        return _Job(index, item, audio, clips, language)

    @property
    def _chunk_samples(self) -> int:
        model, _ = self._loaded()
        return model.feature_extractor.chunk_length * SAMPLE_RATE

    def _clips(self, audio) -> list[tuple[int, int]]:
        """``(start, end)`` sample ranges of at most one chunk (30 s) each, in order."""
        size = self._chunk_samples
        if not self.vad_filter:
            return [(s, min(s + size, audio.size)) for s in range(0, audio.size, size)]
        _faster_whisper()  # MissingExtra before the submodule import below
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        # The batched pipeline's own VAD settings.
        options = VadOptions(max_speech_duration_s=size / SAMPLE_RATE, min_silence_duration_ms=160)
        speech = get_speech_timestamps(audio, options)
        return merge_regions([(r["start"], r["end"]) for r in speech], size)

    def _transcribe(self, group: list[_Job], language: str, task: str) -> None:
        """Run every chunk of ``group`` through the batched pipeline in one call."""
        import numpy as np

        offsets, parts, clips, at = [], [], [], 0
        for job in group:
            offsets.append(at)
            parts.append(job.audio)
            clips += [{"start": _seconds(at + s), "end": _seconds(at + e)} for s, e in job.clips]
            # Whole seconds apart, with a silent gap: a segment maps back by its start time.
            end = at + job.audio.size
            gap = SAMPLE_RATE - end % SAMPLE_RATE + SAMPLE_RATE
            parts.append(np.zeros(gap, dtype=np.float32))
            at = end + gap
        if not clips:
            return
        _, pipeline = self._loaded()
        segments, _info = pipeline.transcribe(
            np.concatenate(parts),
            language=language,
            task=task,
            clip_timestamps=clips,
            vad_filter=False,
            batch_size=self.chunk_batch_size,
            beam_size=self.beam_size,
            max_new_tokens=self.max_new_tokens,
            without_timestamps=True,
            log_progress=False,
        )
        starts = [o / SAMPLE_RATE for o in offsets]
        for seg in segments:
            k = bisect.bisect_right(starts, seg.start + 1e-6) - 1
            group[k].add(seg.start - starts[k], seg.end - starts[k], seg.text)
            if all(j.canceled or j.check_canceled() for j in group):
                break  # leaving the generator skips the remaining forward passes


def _seconds(samples: int) -> float:
    # Half a sample past the boundary, so the pipeline's int(seconds * rate) lands on it.
    return (samples + 0.5) / SAMPLE_RATE


def _concat_clips(audio, clips: list[tuple[int, int]], limit: int):
    """The speech of the first chunk's worth of clips (for language detection)."""
    import numpy as np

    out, total = [], 0
    for s, e in clips:
        out.append(audio[s:e])
        total += e - s
        if total >= limit:
            break
    return np.concatenate(out)[:limit]


def merge_regions(regions: list[tuple[int, int]], max_span: int) -> list[tuple[int, int]]:
    """Merge consecutive ``(start, end)`` regions while one spans at most ``max_span``.

    A region longer than ``max_span`` is cut into pieces of ``max_span``.
    """
    out: list[tuple[int, int]] = []
    for start, end in regions:
        while end - start > max_span:
            out.append((start, start + max_span))
            start += max_span
        if out and end - out[-1][0] <= max_span:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


class _Job:
    """One item's state through a call."""

    def __init__(self, index: int, item: WorkItem, audio, clips: list[tuple[int, int]], language: str):
        self.index, self.item, self.audio, self.clips, self.language = index, item, audio, clips, language
        self.duration = round(audio.size / SAMPLE_RATE, 3)
        self.segments: list[dict[str, Any]] = []
        self.texts: list[str] = []
        self.canceled = False

    def check_canceled(self) -> bool:
        self.canceled = self.canceled or self.item.is_canceled()
        return self.canceled

    def add(self, start: float, end: float, text: str) -> None:
        start = round(min(max(start, 0.0), self.duration), 3)
        end = round(min(max(end, start), self.duration), 3)
        self.texts.append(text)
        self.segments.append({"start": start, "end": end, "text": text.strip()})
        self.item.on_progress(min(end / self.duration, 1.0) if self.duration else 1.0)

    def result(self) -> ItemResult:
        srt, vtt = to_srt(self.segments), to_vtt(self.segments)
        return ItemResult(
            output={
                "text": "".join(self.texts).strip(),
                "language": self.language,
                "duration": self.duration,
                "segments": self.segments,
                "files": {"srt": {"$artifact": "transcript.srt"}, "vtt": {"$artifact": "transcript.vtt"}},
            },
            artifacts=[
                Artifact("transcript.srt", srt.encode(), "application/x-subrip"),
                Artifact("transcript.vtt", vtt.encode(), "text/vtt"),
            ],
        )


# --- subtitles (pure) ---------------------------------------------------------------


def format_timestamp(seconds: float, decimal_marker: str = ",") -> str:
    """``HH:MM:SS,mmm`` (SRT) or, with ``"."``, ``HH:MM:SS.mmm`` (WebVTT)."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue in both formats: keep the text's lines, drop empty ones.
    return "\n".join(line.strip() for line in text.strip().splitlines() if line.strip())


def to_srt(segments: list[dict[str, Any]]) -> str:
    """SubRip: numbered cues separated by blank lines; segments without text are left out."""
    cues: list[str] = []
    for seg in segments:
        text = _cue_text(seg["text"])
        if text:
            span = f"{format_timestamp(seg['start'])} --> {format_timestamp(seg['end'])}"
            cues.append(f"{len(cues) + 1}\n{span}\n{text}\n")
    return "\n".join(cues)


def to_vtt(segments: list[dict[str, Any]]) -> str:
    """WebVTT: the ``WEBVTT`` header, then cues; ``&``, ``<`` and ``>`` escaped as the format needs."""
    cues = ["WEBVTT\n"]
    for seg in segments:
        text = _cue_text(seg["text"]).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        if text:
            cues.append(f"{format_timestamp(seg['start'], '.')} --> {format_timestamp(seg['end'], '.')}\n{text}\n")
    return "\n".join(cues)
