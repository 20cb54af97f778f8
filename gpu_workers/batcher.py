"""The dynamic batcher: one thread per resident model that turns jobs into batched calls.

Celery task threads hand their job to ``submit`` and wait on the returned future. The
batcher takes the oldest waiting job, then gathers more jobs with the same batch key
until the batch is full (``max_batch``, counted in the backend's cost units) or
``max_wait_ms`` has passed since it started gathering, and runs them as one
``run_batch`` call. Jobs with another key wait, in arrival order, for a later batch, so
none is starved by a stream of jobs of a different shape.

Out of memory: when a call fails with the device out of memory, the backend releases
its cached memory and the batch runs again in two halves, recursively. A job that is out
of memory on its own fails with ``out_of_memory``; the others of its batch succeed, and
the batcher goes on serving.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from vramq.jobs.errors import OutOfMemory

from .backends.base import Backend, ItemResult, WorkItem, is_out_of_memory

log = logging.getLogger("vramq.batcher")

ARRIVING_POLL_S = 0.002
"""While gathering, how often the batcher looks whether jobs are still on their way."""


@dataclass
class BatchOutcome:
    """What a job's future resolves to."""

    result: ItemResult | BaseException
    """ItemResult, or the exception the backend returned for this item."""
    gpu_seconds: float
    """This job's share of the call's wall time (by cost)."""
    batch_size: int


@dataclass
class _Pending:
    item: WorkItem
    key: object
    cost: int
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(
        self,
        backend: Backend,
        max_batch: int,
        max_wait_ms: int,
        name: str = "",
        arriving: Callable[[], int] | None = None,
    ):
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.arriving = arriving
        """How many jobs for this model the worker has taken and not yet submitted here
        (None: unknown). With none on their way and none waiting, a batch runs at once:
        an idle worker does not hold a lone job ``max_wait_ms`` for company that is not
        coming. Under load, jobs that arrive while a batch runs make the next one."""
        self._inbox: queue.Queue[_Pending | None] = queue.Queue()
        self._held: deque[_Pending] = deque()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()
        self.batches_run = 0
        self.oom_splits = 0

    def submit(self, item: WorkItem) -> Future:
        cost = max(1, int(self.backend.batch_cost(item.input)))
        pending = _Pending(item, self.backend.batch_key(item.input), cost)
        self._inbox.put(pending)
        return pending.future

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=5)

    # --- the loop -----------------------------------------------------------------

    def _gather(self) -> list[_Pending] | None:
        first = self._held.popleft() if self._held else self._inbox.get()
        if first is None:
            return None
        batch, cost = [first], first.cost
        # Jobs held back earlier with this key join first, in order.
        for held in list(self._held):
            if cost >= self.max_batch:
                break
            if held.key == first.key and cost + held.cost <= self.max_batch:
                self._held.remove(held)
                batch.append(held)
                cost += held.cost
        deadline = time.monotonic() + self.max_wait_s
        drain = None  # past the deadline: how many already-waiting jobs may still be looked at
        while cost < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                drain = self._inbox.qsize() if drain is None else drain - 1
                if drain <= 0:
                    break
            elif self.arriving is not None and self._inbox.empty() and self.arriving() <= 0:
                break  # nothing waiting and nothing on its way
            try:
                if remaining <= 0:
                    p = self._inbox.get_nowait()
                elif self.arriving is None:
                    p = self._inbox.get(timeout=remaining)
                else:  # wake up now and then to see whether anything is still on its way
                    p = self._inbox.get(timeout=min(remaining, ARRIVING_POLL_S))
            except queue.Empty:
                if remaining > 0 and self.arriving is not None:
                    continue
                break
            if p is None:  # stop requested: run this batch, then stop
                self._inbox.put(None)
                break
            if p.key == first.key and cost + p.cost <= self.max_batch:
                batch.append(p)
                cost += p.cost
            else:
                self._held.append(p)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        self.batches_run += 1
        for p, outcome in zip(batch, self._call(batch), strict=True):
            p.future.set_result(outcome)

    def _call(self, batch: list[_Pending]) -> list[BatchOutcome]:
        """One backend call for ``batch``; split in halves while the device is out of memory."""
        items = [p.item for p in batch]
        t0 = time.perf_counter()
        try:
            results = self.backend.run_batch(items)
            if len(results) != len(items):
                raise RuntimeError(f"backend returned {len(results)} results for {len(items)} items")
        except BaseException as exc:  # the whole call failed
            if not is_out_of_memory(exc):
                log.exception("batch of %d failed", len(items))
                results = [exc] * len(items)
            else:
                self.backend.release_memory()
                if len(batch) > 1:
                    self.oom_splits += 1
                    half = len(batch) // 2
                    log.warning(
                        "out of memory on a batch of %d; running it again as %d + %d",
                        len(batch),
                        half,
                        len(batch) - half,
                    )
                    return self._call(batch[:half]) + self._call(batch[half:])
                log.warning("job %s is out of memory on its own: %s", items[0].job_id, exc)
                results = [OutOfMemory(f"the device ran out of memory for this job even alone ({exc})")]
        elapsed = time.perf_counter() - t0
        total_cost = sum(p.cost for p in batch)
        return [BatchOutcome(r, elapsed * p.cost / total_cost, len(batch)) for p, r in zip(batch, results, strict=True)]
