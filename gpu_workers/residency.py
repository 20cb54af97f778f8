"""Which models a worker holds in memory, and which it loads on demand.

A worker serves every model the planner placed on its card. When their estimates do
not all fit in the card's budget at once, the ones that fit stay resident and the rest
are loaded when a job needs them, evicting the least recently used models that no job
is using at that moment. A job that had to wait for its model to load reports the load
time as a cold start.

Rules:
- A model in use (a job holds it through ``use``) is never evicted; a load that needs
  its room waits until it is released. Meanwhile that model takes no new jobs (it is
  draining), so a steady stream of jobs for it cannot starve the waiting model.
- One model loads at a time per worker; jobs for a model being loaded wait for it.
- A budget of ``None`` means no limit: every model stays resident once loaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from vramq.jobs.errors import ModelLoadFailed

log = logging.getLogger("vramq.residency")


@dataclass
class ModelStats:
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    """Total seconds spent loading this model (all loads)."""


@dataclass
class Hold:
    """A model held for one job: its handle and the cold-start seconds the job waited."""

    handle: object
    cold_start_s: float


@dataclass
class _Slot:
    handle: object = None
    in_use: int = 0
    loading: bool = False
    last_load_s: float = 0.0
    load_epoch: int = 0
    failed: str | None = None
    """Why loading this model failed last; not tried again before ``retry_at``."""
    retry_at: float = 0.0
    retry_after_s: float = 0.0


class Residency:
    def __init__(
        self,
        need_bytes: dict[str, int],
        budget_bytes: int | None,
        load: Callable[[str], object],
        unload: Callable[[str, object], None],
        retry_load_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.retry_load_after_s, self.clock = retry_load_after_s, clock
        self.need = dict(need_bytes)
        self.budget = budget_bytes
        self._load, self._unload = load, unload
        self._slots = {m: _Slot() for m in need_bytes}
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded models, least recently used first
        self._draining: set[str] = set()  # in use, and wanted out by a load that waits for them
        self._cond = threading.Condition()
        self.stats = {m: ModelStats() for m in need_bytes}

    # --- what is loaded -----------------------------------------------------------

    @property
    def resident(self) -> list[str]:
        with self._cond:
            return list(self._lru)

    @property
    def resident_bytes(self) -> int:
        with self._cond:
            return sum(self.need[m] for m in self._lru)

    def fits_alongside(self, model_ids: list[str]) -> list[str]:
        """The prefix of ``model_ids`` (in order) whose estimates fit the budget together."""
        out, used = [], 0
        for m in model_ids:
            if self.budget is None or used + self.need[m] <= self.budget:
                out.append(m)
                used += self.need[m]
        return out

    # --- using a model ------------------------------------------------------------

    @contextmanager
    def use(self, model_id: str) -> Iterator[Hold]:
        """Hold ``model_id`` loaded for the duration of the block (loading it if needed)."""
        hold = self.acquire(model_id)
        try:
            yield hold
        finally:
            self.release(model_id)

    @property
    def failed(self) -> dict[str, str]:
        """Models this worker could not load and will not try again yet, with the reason
        (announced in its heartbeat: admission and other workers' turns avoid it)."""
        now = self.clock()
        with self._cond:
            return {m: s.failed for m, s in self._slots.items() if s.failed and now < s.retry_at}

    def acquire(self, model_id: str) -> Hold:
        """Hold ``model_id``, loading it first if needed. Raises ``ModelLoadFailed`` when it
        cannot be loaded, and at once for a model whose load failed within its cool-down
        (``retry_load_after_s``, doubling on each failure up to an hour): broken weights
        are not loaded again for every job, and a passing fault heals by itself."""
        slot = self._slots[model_id]
        waited_for_load = False
        with self._cond:
            while True:
                if slot.failed and self.clock() < slot.retry_at:
                    raise ModelLoadFailed(f"model {model_id} could not be loaded on this worker: {slot.failed}")
                if slot.handle is not None and not slot.loading and model_id not in self._draining:
                    slot.in_use += 1
                    self._lru.move_to_end(model_id)
                    return Hold(slot.handle, slot.last_load_s if waited_for_load else 0.0)
                if slot.loading or self._someone_loading():
                    waited_for_load = waited_for_load or slot.loading
                    self._cond.wait()
                    continue
                if slot.handle is not None:  # loaded but draining: wait until it takes jobs again
                    self._cond.wait()
                    continue
                victims = self._victims_for(model_id)
                if victims is None:  # the room is held by models in use: drain them, wait
                    self._draining |= self._in_the_way(model_id)
                    self._cond.wait()
                    continue
                self._draining.clear()  # a waiting load marks again what it needs when it wakes
                slot.loading = True
                for v in victims:
                    self._lru.pop(v)
                    self._slots[v].loading = True  # unloading: nobody may take it meanwhile
                break
        # Outside the lock: evictions and the load take seconds.
        try:
            for v in victims:
                self._evict(v)
            t0 = time.perf_counter()
            handle = self._load(model_id)
            elapsed = time.perf_counter() - t0
        except Exception as exc:
            log.exception("loading %s failed", model_id)
            with self._cond:
                slot.loading = False
                slot.failed = f"{type(exc).__name__}: {exc}"[:500]
                slot.retry_after_s = min(max(slot.retry_after_s * 2, self.retry_load_after_s), 3600.0)
                slot.retry_at = self.clock() + slot.retry_after_s
                self._cond.notify_all()
            raise ModelLoadFailed(f"model {model_id} could not be loaded: {slot.failed}") from exc
        except BaseException:
            with self._cond:
                slot.loading = False
                self._cond.notify_all()
            raise
        with self._cond:
            slot.handle, slot.loading, slot.last_load_s = handle, False, elapsed
            slot.failed, slot.retry_after_s = None, 0.0
            slot.in_use += 1
            self._lru[model_id] = None
            st = self.stats[model_id]
            st.loads += 1
            st.load_seconds += elapsed
            self._cond.notify_all()
        log.info("loaded %s in %.2fs (resident: %s)", model_id, elapsed, list(self._lru))
        return Hold(handle, elapsed)

    def release(self, model_id: str) -> None:
        with self._cond:
            self._slots[model_id].in_use -= 1
            self._cond.notify_all()

    def load_now(self, model_id: str) -> float:
        """Load a model ahead of any job (a worker's resident set at start); its load seconds."""
        hold = self.acquire(model_id)
        self.release(model_id)
        return hold.cold_start_s

    def unload_all(self) -> None:
        with self._cond:
            loaded = list(self._lru)
            self._lru.clear()
        for m in loaded:
            self._evict(m, count=False)

    # --- eviction -----------------------------------------------------------------

    def _someone_loading(self) -> bool:
        return any(s.loading for s in self._slots.values())

    def _victims_for(self, model_id: str) -> list[str] | None:
        """Least recently used idle models to evict so ``model_id`` fits; None: wait."""
        if self.budget is None:
            return []
        used = sum(self.need[m] for m in self._lru)
        victims = []
        for m in self._lru:  # least recently used first
            if used + self.need[model_id] <= self.budget:
                break
            if self._slots[m].in_use == 0:
                victims.append(m)
                used -= self.need[m]
        if used + self.need[model_id] <= self.budget:
            return victims
        if self.need[model_id] > self.budget and not any(self._slots[m].in_use for m in self._lru):
            log.warning(
                "%s needs %d bytes, more than the budget %d; loading it alone",
                model_id,
                self.need[model_id],
                self.budget,
            )
            return list(self._lru)
        return None

    def _in_the_way(self, model_id: str) -> set[str]:
        """The least recently used models, in use or not, whose room ``model_id`` needs."""
        if self.budget is None:  # no limit: nothing is in the way (as in _victims_for)
            return set()
        used = sum(self.need[m] for m in self._lru)
        out = set()
        for m in self._lru:
            if used + self.need[model_id] <= self.budget:
                break
            out.add(m)
            used -= self.need[m]
        return out

    def _evict(self, model_id: str, count: bool = True) -> None:
        slot = self._slots[model_id]
        handle = slot.handle
        try:
            self._unload(model_id, handle)
        except Exception:
            log.exception("unloading %s failed", model_id)
        with self._cond:
            slot.handle, slot.loading = None, False
            if count:
                self.stats[model_id].evictions += 1
            self._cond.notify_all()
        log.info("evicted %s", model_id)
