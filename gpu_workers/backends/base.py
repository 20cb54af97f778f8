"""The contract between the worker runtime and a model backend.

A backend is loaded once (``load``) and then runs many batches (``run_batch``), the
cog ``setup()/predict()`` shape. The runtime owns everything around it: taking jobs,
batching, storing artifacts, recording outcomes. Backends never touch the database,
the broker or the object store.
"""

from __future__ import annotations

import abc
import functools
import gc
import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class WorkItem:
    """One job as a backend sees it."""

    job_id: str
    input: dict[str, Any]
    """Validated input with the catalog's defaults applied (and ``seed`` always set)."""
    on_progress: Callable[[float], None] = lambda fraction: None
    """Report progress in [0, 1]; cheap, call it every step."""
    is_canceled: Callable[[], bool] = lambda: False
    """True once the job was canceled; check it between steps."""
    on_delta: Callable[[str], None] = lambda text: None
    """Stream a piece of generated text (text backends); the pieces joined are the output text."""
    attachments: dict[str, bytes] = field(default_factory=dict)
    """Binary inputs by input field name, already fetched (e.g. ``{"audio": b"RIFF…"}`` for
    a speech job whose ``input["audio"]`` is a ``file_…`` id or a ``data:`` URI)."""


@dataclass
class Artifact:
    """A file a job produced. The runtime stores it under ``jobs/<job_id>/<name>``."""

    name: str
    source: bytes | Callable[[], bytes]
    """The file's bytes, or a function that makes them (see ``data``)."""
    content_type: str

    @functools.cached_property
    def data(self) -> bytes:
        """The file's bytes. A function ``source`` runs on first use: an image's PNG
        encoding then happens on the job's own thread as it is stored, while the model's
        batcher thread is already running the next batch."""
        return self.source if isinstance(self.source, bytes) else self.source()


@dataclass
class ItemResult:
    """The outcome of one item: its output document and the files it references.

    Inside ``output``, ``{"$artifact": name}`` stands for the artifact of that name; the
    runtime replaces it with a reference to the stored object, and the API turns that
    into a signed link when the job is read.
    """

    output: dict[str, Any]
    artifacts: list[Artifact] = field(default_factory=list)
    gpu_seconds: float | None = None
    """Device time this item used, for backends that measure it themselves (``"engine"``
    backends: the request's wall time divided among the requests running beside it).
    None: the runtime uses the item's share of its ``run_batch`` call."""


class Backend(abc.ABC):
    """A model kept resident on one device, running batches of compatible jobs."""

    #: How jobs reach the model. ``"batcher"``: the runtime's dynamic batcher groups
    #: compatible jobs into ``run_batch`` calls. ``"engine"``: the backend batches by itself
    #: (vLLM's continuous batching); every task thread calls ``run_one`` concurrently.
    batching = "batcher"

    def __init__(self, entry, device: str):
        self.entry = entry  # jobs.catalog.ModelEntry
        self.device = device  # "cpu" or "cuda"
        self.memory_fraction: float | None = None
        """The share of the card the planner gave this model (its estimate / the card's
        budget), set before ``load``; backends that reserve memory up front (vLLM) keep to it."""

    @abc.abstractmethod
    def load(self) -> None:
        """Load the weights onto the device. Called once, before any batch."""

    def batch_key(self, inp: dict[str, Any]) -> Hashable:
        """Jobs whose inputs have equal keys may run in one call. Default: never share."""
        return id(inp)

    def batch_cost(self, inp: dict[str, Any]) -> int:
        """How much of ``max_batch`` one job uses (images for an image job)."""
        return 1

    @abc.abstractmethod
    def run_batch(self, items: list[WorkItem]) -> list[ItemResult | BaseException]:
        """Run the items as one call; return one result or exception per item, in order.

        Raise (rather than return) only for a failure of the whole call; the runtime then
        fails or retries every item. An item canceled mid-run is returned as
        ``jobs.errors.JobCanceled``.
        """

    def run_one(self, item: WorkItem) -> ItemResult:
        """Run one job (``batching = "engine"`` backends); raise ``JobError`` to fail it.

        Called from many threads at once; must return promptly after ``is_canceled()``
        turns true (raising ``JobCanceled``).
        """
        raise NotImplementedError(f"{type(self).__name__} batches through run_batch")

    def unload(self) -> None:  # noqa: B027 (optional: backends that hold nothing need not override it)
        """Release the model's memory."""

    def release_memory(self) -> None:
        """Give cached device memory back after an out-of-memory error (the model stays loaded)."""
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error from torch, CTranslate2 or a backend's own check."""
    from vramq.jobs.errors import OutOfMemory

    if isinstance(exc, OutOfMemory) or type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
