"""Model backends, found by the catalog entry's ``(kind, backend)``.

Each backend lives in its own module and is imported only when asked for, so
importing this package never imports torch or any other heavy dependency.
"""

from __future__ import annotations

from importlib import import_module

from vramq.jobs.errors import ConfigError

from .base import Artifact, Backend, ItemResult, WorkItem

__all__ = ["Artifact", "Backend", "ItemResult", "WorkItem", "backend_class"]

_BACKENDS: dict[tuple[str, str], str] = {
    ("image", "diffusers"): "vramq.gpu_workers.backends.diffusers_image:DiffusersImageBackend",
    ("video", "diffusers"): "vramq.gpu_workers.backends.diffusers_video:DiffusersVideoBackend",
    ("text", "vllm"): "vramq.gpu_workers.backends.vllm_text:VllmTextBackend",
    ("text", "echo"): "vramq.gpu_workers.backends.echo:EchoBackend",
    ("speech", "faster_whisper"): "vramq.gpu_workers.backends.whisper_speech:WhisperSpeechBackend",
}
"""``(kind, backend)`` -> ``"module:Class"``, imported lazily."""


def backend_class(entry) -> type[Backend]:
    """The ``Backend`` subclass that serves a ``jobs.catalog.ModelEntry``."""
    path = _BACKENDS.get((entry.kind, entry.backend))
    if path is None:
        raise ConfigError(f"model {entry.id!r}: no backend serves kind {entry.kind!r} with backend {entry.backend!r}")
    module, _, name = path.partition(":")
    return getattr(import_module(module), name)
