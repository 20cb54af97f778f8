"""Audio made in the tests: tones, vowel-like speech, WAV/MP3 bytes, data URIs."""

from __future__ import annotations

import base64
import io
import re
import wave

import numpy as np

SR = 16000


def tone(seconds: float, rate: int = SR, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = SR) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def encode(samples: np.ndarray, codec: str, fmt: str, rate: int = SR, frame_size: int = 1152) -> bytes:
    """Mono ``samples`` encoded by FFmpeg (PyAV) as ``codec`` in container ``fmt``."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        for start in range(0, samples.size, frame_size):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + frame_size], format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def mp3_bytes(samples: np.ndarray, rate: int = SR) -> bytes:
    return encode(samples, "mp3", "mp3", rate)


def vowels(seconds: float, seed: int = 0) -> np.ndarray:
    """Voiced, vowel-like sound: a pitch pulse train through formant resonators,
    shaped into syllables. Silero VAD takes it for speech; a pure tone it does not."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    pulses = np.diff(np.floor(np.cumsum((110 + 25 * np.sin(2 * np.pi * 0.7 * t)) / SR)), prepend=0.0)
    formants = [(730, 1090, 2440), (270, 2290, 3010), (570, 840, 2410), (300, 870, 2240), (530, 1840, 2480)]
    out = np.zeros(n)
    syllable = int(0.15 * SR)
    for a in range(0, n, syllable):
        seg = pulses[a : a + syllable]
        voiced = np.zeros_like(seg)
        for j, f in enumerate(formants[rng.integers(len(formants))]):
            r = np.exp(-np.pi * 90 / SR)
            c1, c2, y1, y2 = 2 * r * np.cos(2 * np.pi * f / SR), -r * r, 0.0, 0.0
            for i, v in enumerate(seg):
                y0 = (1 - r) * v + c1 * y1 + c2 * y2
                voiced[i] += y0 * 0.6**j
                y2, y1 = y1, y0
        env = np.sin(np.pi * np.linspace(0, 1, seg.size)) ** 1.5
        out[a : a + seg.size] = voiced * env + 0.02 * rng.standard_normal(seg.size) * env
    return (0.5 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def data_uri(data: bytes, media_type: str = "audio/wav") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words: word-level Levenshtein."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / len(ref)
