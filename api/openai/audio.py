"""``/audio/transcriptions`` and ``/audio/translations``: the upload becomes a vramq
audio file (``jobs.files``: decoded in full, bounded, counted against the caller's
upload quota), then a speech job, waited on.

``response_format``: ``json`` (``{"text"}``), ``text``, ``srt`` and ``vtt`` (the job's
own subtitle files), ``verbose_json`` (language, duration and segments). Segments are
the backend's chunk-level ones (``gpu_workers.backends.whisper_speech``), so
``timestamp_granularities`` takes ``segment`` only; the per-token figures OpenAI's
verbose segments carry (``avg_logprob``…) are not computed and are 0. ``prompt`` and
a non-zero ``temperature`` are refused: the backend decodes without either.
"""

from __future__ import annotations

from typing import Any

from flask import Response, request

from vramq.jobs.files import store_file

from ..callers import current_caller
from ..files_api import upload_quota
from . import bp
from .files import read_upload
from .waiting import bad, entry_of, failure, services, submit, wait

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


@bp.post("/audio/transcriptions")
def create_transcription():
    return _speech("transcribe", "/audio/transcriptions")


@bp.post("/audio/translations")
def create_translation():
    return _speech("translate", "/audio/translations")


def _speech(task: str, endpoint: str):
    form = request.form
    fmt = form.get("response_format") or "json"
    if fmt not in FORMATS:
        raise bad("response_format", f"must be one of {', '.join(FORMATS)}")
    grains = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    if set(grains) - {"segment"}:
        raise bad("timestamp_granularities", "only segment: the backend times its segments, not words")
    if form.get("prompt"):
        raise bad("prompt", "not supported: the speech backend decodes without a prompt")
    if form.get("temperature") not in (None, "", "0", "0.0"):
        raise bad("temperature", "not supported: the speech backend decodes greedily (temperature 0)")
    language = form.get("language") or None
    if language is not None and task == "translate":
        raise bad("language", "not a parameter of translations (the language is detected)")
    entry_of(form.get("model"), "speech", endpoint)
    data, filename = read_upload()
    caller = current_caller()
    row = store_file(services(), data, filename, "audio", caller.id, quota=upload_quota(caller, services().settings))
    inp: dict[str, Any] = {"audio": row.id, "task": task}
    if language is not None:
        inp["language"] = language
    job = submit(form["model"], inp)
    stored, data_ = wait(job.id)
    if data_["status"] != "succeeded" or data_["output"] is None:
        raise failure(data_)
    out = data_["output"]
    if fmt == "json":
        return {"text": out["text"]}
    if fmt == "text":
        return Response(out["text"] + "\n", mimetype="text/plain")
    if fmt in ("srt", "vtt"):
        key = (stored.output or {})["files"][fmt]["$object"]
        return Response(services().store.get(key), mimetype="text/plain")
    return {
        "task": task,
        "language": out["language"],
        "duration": out["duration"],
        "text": out["text"],
        "segments": [
            {
                "id": i,
                "seek": 0,
                "start": seg["start"],
                "end": seg["end"],
                "text": seg["text"],
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": 0.0,
                "compression_ratio": 0.0,
                "no_speech_prob": 0.0,
            }
            for i, seg in enumerate(out["segments"])
        ],
    }
