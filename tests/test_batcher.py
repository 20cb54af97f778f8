"""The dynamic batcher, driven through the Backend contract by a recording backend."""

from __future__ import annotations

import threading
import time

from vramq.gpu_workers.backends.base import Backend, ItemResult, WorkItem
from vramq.gpu_workers.batcher import Batcher


class Recorder(Backend):
    """Records each call's job ids; sleeps to simulate model time."""

    def __init__(self, delay: float = 0.05, fail_on: str | None = None):
        super().__init__(entry=None, device="cpu")
        self.calls: list[list[str]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.gate = threading.Event()
        self.gate.set()

    def load(self):
        pass

    def batch_key(self, inp):
        return inp["size"]

    def batch_cost(self, inp):
        return inp.get("n", 1)

    def run_batch(self, items):
        self.gate.wait()
        self.calls.append([i.job_id for i in items])
        time.sleep(self.delay)
        if any(i.job_id == self.fail_on for i in items):
            raise RuntimeError("device fell over")
        return [ItemResult({"id": i.job_id}) if i.job_id != "bad" else ValueError("bad item") for i in items]


def item(job_id, size=64, n=1):
    return WorkItem(job_id=job_id, input={"size": size, "n": n})


def test_compatible_jobs_share_a_call_up_to_max_batch():
    be = Recorder()
    be.gate.clear()  # hold the first call so the rest queue up
    b = Batcher(be, max_batch=4, max_wait_ms=50)
    futures = [b.submit(item(f"j{i}")) for i in range(9)]
    be.gate.set()
    outcomes = [f.result(timeout=5) for f in futures]
    assert sorted(len(c) for c in be.calls) == [1, 4, 4]
    assert [o.result.output["id"] for o in outcomes] == [f"j{i}" for i in range(9)]
    assert all(o.gpu_seconds > 0 for o in outcomes)
    b.stop()


def test_incompatible_jobs_wait_their_turn_in_order():
    be = Recorder()
    be.gate.clear()
    b = Batcher(be, max_batch=4, max_wait_ms=20)
    futures = [b.submit(item("a1", 64)), b.submit(item("b1", 128)), b.submit(item("a2", 64)), b.submit(item("b2", 128))]
    be.gate.set()
    [f.result(timeout=5) for f in futures]
    assert be.calls == [["a1", "a2"], ["b1", "b2"]]
    b.stop()


def test_cost_counts_images_not_jobs():
    be = Recorder()
    be.gate.clear()
    b = Batcher(be, max_batch=4, max_wait_ms=20)
    futures = [b.submit(item("x", n=3)), b.submit(item("y", n=2)), b.submit(item("z", n=1))]
    be.gate.set()
    [f.result(timeout=5) for f in futures]
    assert be.calls == [["x", "z"], ["y"]]
    b.stop()


def test_a_lone_job_waits_at_most_max_wait():
    be = Recorder(delay=0)
    b = Batcher(be, max_batch=8, max_wait_ms=30)
    t0 = time.perf_counter()
    b.submit(item("solo")).result(timeout=5)
    assert time.perf_counter() - t0 < 3  # it did not wait for a full batch that never comes
    assert be.calls == [["solo"]]
    b.stop()


def test_item_errors_and_call_errors_reach_the_right_jobs():
    be = Recorder(fail_on="boom")
    b = Batcher(be, max_batch=2, max_wait_ms=50)
    good, bad = b.submit(item("good")), b.submit(item("bad"))
    assert good.result(timeout=5).result.output == {"id": "good"}
    assert isinstance(bad.result(timeout=5).result, ValueError)
    whole = [b.submit(item("boom")), b.submit(item("other"))]
    assert all(isinstance(f.result(timeout=5).result, RuntimeError) for f in whole)
    # The batcher keeps serving after a failed call.
    assert b.submit(item("after")).result(timeout=5).result.output == {"id": "after"}
    b.stop()


def test_a_lone_job_runs_at_once_when_nothing_else_is_on_its_way():
    """The worker says how many of its jobs are still on their way to the batcher: none,
    and a lone job does not wait ``max_wait_ms`` for company."""
    on_their_way = [0]
    be = Recorder(delay=0)
    b = Batcher(be, max_batch=4, max_wait_ms=400, arriving=lambda: on_their_way[0])
    t0 = time.monotonic()
    b.submit(item("alone")).result(timeout=5)
    assert time.monotonic() - t0 < 0.2  # not the 0.4 s gathering window
    # One more on its way: the batcher waits for it, and both run in one call.
    on_their_way[0] = 1
    first = b.submit(item("first"))
    time.sleep(0.1)
    assert not first.done()
    on_their_way[0] = 0
    second = b.submit(item("second"))
    first.result(timeout=5), second.result(timeout=5)
    assert be.calls == [["alone"], ["first", "second"]]
    b.stop()
