"""``/openai/v1``: the OpenAI API's shape over vramq's queue, for the ``openai`` SDKs and
the tools built on them.

Every call is a vramq job (or a vramq batch) underneath, with the same admission,
metering, fair turns, priorities, history, retention and ``Idempotency-Key`` as
``/v1``; the synchronous endpoints submit a job and wait for it. One module per area:

- ``errors``: every error under ``/openai/v1`` in OpenAI's shape
- ``bodies``: OpenAI request bodies read as job inputs, job results written as responses
- ``waiting``: submitting a job and waiting on it (or following its events)
- ``chat``: ``/models``, ``/chat/completions``, ``/completions``
- ``images``: ``/images/generations``
- ``audio``: ``/audio/transcriptions``, ``/audio/translations``
- ``files``, ``batches``, ``outputs``: the Batch API
- ``document``: these routes in ``/openapi.json``
"""

from __future__ import annotations

from flask import Blueprint

PREFIX = "/openai/v1"

bp = Blueprint("openai", __name__, url_prefix=PREFIX)

from . import audio, batches, chat, errors, files, images  # noqa: E402  (the routes, on bp)

__all__ = ["PREFIX", "audio", "batches", "bp", "chat", "errors", "files", "images"]
