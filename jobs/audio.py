"""Audio inputs: what a file really holds, and ``data:`` URIs.

An upload's name and declared type are never believed: ``probe_audio`` opens the bytes
with FFmpeg (PyAV) and decodes every frame, within bounds: a declared duration past
the limit is refused before decoding, decoding stops past the limit, and it has a CPU
budget. Decoding is what tells a truncated or
corrupt file from a good one, and the duration is the decoded sample count (an MP3
cut in half still claims its full length in its headers). FFmpeg decodes compressed
audio several hundred times faster than real time, so an hour of MP3 takes seconds.

PyAV is imported when a function needs it; without it the functions raise
``MissingExtra`` naming the ``speech`` extra.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from .errors import InputError, MissingExtra

if TYPE_CHECKING:
    from av.audio.stream import AudioStream
    from av.container import InputContainer

#: Content types by FFmpeg demuxer (``container.format.name`` is a comma-separated list).
CONTENT_TYPES = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "aac": "audio/aac",
    "mov": "audio/mp4",  # "mov,mp4,m4a,3gp,3g2,mj2"
    "matroska": "audio/webm",  # "matroska,webm"
    "aiff": "audio/aiff",
    "amr": "audio/amr",
    "caf": "audio/x-caf",
    "w64": "audio/wav",
}


@dataclass(frozen=True)
class AudioInfo:
    """What decoding an audio file found."""

    duration_s: float
    sample_rate: int
    channels: int
    codec: str
    content_type: str


def _av() -> ModuleType:
    """PyAV, or ``MissingExtra`` naming the ``speech`` extra."""
    try:
        import av
    except ImportError:
        raise MissingExtra("av", "speech") from None
    return av


def _invalid(what: str, loc: Sequence[str]) -> InputError:
    return InputError(what, [{"loc": list(loc), "msg": what}], code="invalid_audio")


#: A declared (header) duration may be an estimate (an MP3 without a Xing header is
#: judged from its bit rate): it is refused only this far past the limit. The decoded
#: duration, which is exact, is held to the limit itself.
HEADER_SLACK = 1.05


def declared_seconds(container: InputContainer, stream: AudioStream) -> float | None:
    """The duration the file's headers declare (stream, else container), or None."""
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def probe_audio(
    data: bytes,
    *,
    loc: Sequence[str] = ("file",),
    max_seconds: float | None = None,
    cpu_budget_s: float | None = None,
    limit_name: str = "max_audio_seconds",
) -> AudioInfo:
    """Decode ``data`` and describe it; ``InputError`` (``invalid_audio``) if it is
    empty, not a format FFmpeg knows, has no audio stream, or fails to decode.

    With ``max_seconds`` the work is bounded: a file whose headers declare more than
    that (with ``HEADER_SLACK``) is refused before a frame is decoded, and decoding
    stops as soon as more than ``max_seconds`` have been decoded (headers can lie);
    both are ``audio_too_long``, naming ``limit_name``. With ``cpu_budget_s``, a decode
    that takes more CPU time than that (this thread's) is refused (``invalid_audio``)."""
    if not data:
        raise _invalid("the audio file is empty", loc)
    _av()
    import av

    cpu0 = time.thread_time()
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except av.error.FFmpegError:
        raise _invalid("not an audio file: no audio format recognised in its content", loc) from None
    with container:
        streams = container.streams.audio
        if not streams:
            found = ", ".join(sorted({s.type for s in container.streams})) or "none"
            raise _invalid(f"the file ({container.format.name}) has no audio stream (streams found: {found})", loc)
        stream = streams[0]
        if max_seconds is not None:
            declared = declared_seconds(container, stream)
            if declared is not None and declared > max_seconds * HEADER_SLACK:
                raise _too_long(
                    f"the file declares {declared:.0f} s of audio, over the limit of {max_seconds:g} s ({limit_name})",
                    loc,
                )
        samples, rate = 0, stream.codec_context.sample_rate or 0
        try:
            for frame in container.decode(stream):
                samples += frame.samples
                rate = frame.sample_rate or rate
                if max_seconds is not None and rate and samples > max_seconds * rate:
                    raise _too_long(
                        f"the audio decodes to more than the limit of {max_seconds:g} s "
                        f"({limit_name}); decoding stopped there",
                        loc,
                    )
                if cpu_budget_s is not None and time.thread_time() - cpu0 > cpu_budget_s:
                    decoded = f"{samples / rate:.0f} s" if rate else "nothing"
                    raise _invalid(
                        f"the audio took more than {cpu_budget_s:g} s of CPU to check "
                        f"(VRAMQ_AUDIO_PROBE_CPU_SECONDS; {decoded} decoded by then)",
                        loc,
                    )
        except av.error.FFmpegError as exc:
            decoded = f"{samples / rate:.2f} s" if rate else "nothing"
            why = exc.strerror or str(exc)
            raise _invalid(f"the audio is truncated or corrupt (decoding failed after {decoded}: {why})", loc) from None
        if samples == 0 or not rate:
            raise _invalid("the audio is truncated or corrupt: no audio frame could be decoded", loc)
        fmt = container.format.name
        codec = stream.codec_context.name
        channels = stream.codec_context.channels
    names = fmt.split(",")
    content_type = next((ct for name, ct in CONTENT_TYPES.items() if name in names), "application/octet-stream")
    return AudioInfo(
        duration_s=round(samples / rate, 3),
        sample_rate=rate,
        channels=channels,
        codec=codec,
        content_type=content_type,
    )


def _too_long(what: str, loc: Sequence[str]) -> InputError:
    return InputError(what, [{"loc": list(loc), "msg": what}], code="audio_too_long")


_DATA_URI = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),", re.DOTALL)


def parse_data_uri(uri: str, max_bytes: int, *, loc: Sequence[str] = ("input", "audio")) -> bytes:
    """The bytes of a ``data:audio/…;base64,…`` URI.

    ``InputError`` if it is not such a URI, is not base64 (or the base64 is bad), or
    would decode to more than ``max_bytes`` (code ``payload_too_large``); the size is
    judged before anything is decoded.
    """

    def bad(msg: str, code: str = "invalid_input") -> InputError:
        return InputError(msg, [{"loc": list(loc), "msg": msg}], code=code)

    m = _DATA_URI.match(uri)
    if m is None:
        raise bad("not a data URI: expected data:audio/<type>;base64,<data>")
    media_type = m["type"].strip().lower()
    if not media_type.startswith("audio/"):
        raise bad(f"data URI media type must be audio/…, got {media_type or 'none'!r}")
    if "base64" not in [p.strip().lower() for p in m["params"].split(";")]:
        raise bad("data URI must be base64-encoded (data:audio/<type>;base64,<data>)")
    payload = re.sub(r"\s+", "", uri[m.end() :])
    estimate = len(payload) * 3 // 4 - payload[-2:].count("=")
    if estimate > max_bytes:
        raise bad(f"data URI decodes to {estimate} bytes, over the limit of {max_bytes} bytes", "payload_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad(f"data URI has invalid base64: {exc}") from None
    if not data:
        raise bad("data URI holds no data", "invalid_audio")
    return data
