"""Out-of-memory survival: a batch that does not fit is run again in halves; the job that
does not fit even alone fails with ``out_of_memory``; the rest succeed and the worker goes on.

The card's limit is played by a wrapper around the loaded pipeline, which raises the real
``torch.cuda.OutOfMemoryError`` when a call would render more images than the limit;
everything else (the tiny FLUX pipeline, the batcher, the runtime's error codes) is real.
"""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from vramq.gpu_workers.backends import WorkItem, backend_class  # noqa: E402
from vramq.gpu_workers.backends.base import ItemResult, is_out_of_memory  # noqa: E402
from vramq.gpu_workers.batcher import Batcher  # noqa: E402
from vramq.jobs.catalog import ModelEntry  # noqa: E402
from vramq.jobs.errors import OutOfMemory  # noqa: E402

LIMIT_IMAGES = 2


class CardLimit:
    """The loaded pipeline on a card that holds ``LIMIT_IMAGES`` images per call; records
    every call's job ids (each test job's prompt is its id)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.calls: list[list[str]] = []

    def __call__(self, **kwargs):
        prompts = kwargs["prompt"]
        self.calls.append(list(dict.fromkeys(prompts)))
        if len(prompts) > LIMIT_IMAGES:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


@pytest.fixture
def flux(models_dir):
    entry = ModelEntry(
        id="tiny-flux",
        kind="image",
        backend="diffusers",
        weights=models_dir / "tiny-flux",
        dtype="float32",
        max_batch=4,
    )
    backend = backend_class(entry)(entry, "cpu")
    backend.load()
    backend.pipe = CardLimit(backend.pipe)
    released = []
    real_release = backend.release_memory
    backend.release_memory = lambda: (released.append(1), real_release())
    yield backend, released
    backend.unload()


def job(job_id: str, num_images: int) -> WorkItem:
    inp = {
        "prompt": job_id,
        "negative_prompt": None,
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance": 0.0,
        "seed": 7,
        "num_images": num_images,
    }
    return WorkItem(job_id=job_id, input=inp)


@pytest.mark.e2e
def test_oversized_job_fails_alone_and_the_rest_of_its_batch_succeeds(flux):
    backend, released = flux
    gate = threading.Event()
    real = backend.run_batch

    def held(items):  # hold the batcher until all three are queued, so they share one call
        gate.wait(5)
        return real(items)

    backend.run_batch = held
    batcher = Batcher(backend, max_batch=8, max_wait_ms=200)
    try:
        futures = {j: batcher.submit(job(j, n)) for j, n in (("small-a", 1), ("huge", 3), ("small-b", 1))}
        gate.set()
        out = {j: f.result(timeout=60) for j, f in futures.items()}
        # The first call held all three (5 images); halves were tried until each fit or stood alone.
        assert backend.pipe.calls[0] == ["small-a", "huge", "small-b"]
        assert ["huge"] in backend.pipe.calls
        assert isinstance(out["huge"].result, OutOfMemory) and out["huge"].result.code == "out_of_memory"
        for j in ("small-a", "small-b"):
            assert isinstance(out[j].result, ItemResult), out[j].result
            assert len(out[j].result.artifacts) == 1
        assert released, "cached memory was not released after the out-of-memory error"
        assert batcher.oom_splits >= 1
        # The worker goes on: the next job renders.
        nxt = batcher.submit(job("next", 1)).result(timeout=60)
        assert isinstance(nxt.result, ItemResult) and nxt.batch_size == 1
    finally:
        batcher.stop()


@pytest.mark.e2e
def test_outputs_after_a_split_equal_outputs_rendered_alone(flux):
    """Splitting changes only which call renders a job, never what it renders."""
    backend, _ = flux
    limited, backend.pipe = backend.pipe, backend.pipe.pipe  # no limit for the reference
    alone = backend.run_batch([job("a", 1)])[0].artifacts[0].data
    backend.pipe = limited
    batcher = Batcher(backend, max_batch=8, max_wait_ms=200)
    try:
        futures = [batcher.submit(job("a", 1)), batcher.submit(job("b", 2))]
        results = [f.result(timeout=60).result for f in futures]
    finally:
        batcher.stop()
    assert all(isinstance(r, ItemResult) for r in results)
    assert results[0].artifacts[0].data == alone


def test_what_counts_as_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(OutOfMemory("x"))
    assert is_out_of_memory(RuntimeError("CUDA failed with error out of memory"))  # CTranslate2's wording
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))
