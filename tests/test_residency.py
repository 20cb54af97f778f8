"""Model residency: the models that fit stay loaded; others load on demand, evicting the
least recently used idle model; a model in use is never evicted."""

from __future__ import annotations

import threading
import time

import pytest

from vramq.gpu_workers.residency import Residency
from vramq.jobs.errors import ModelLoadFailed


class Models:
    """Loads and unloads recorded in order; a load takes ``delay`` seconds."""

    def __init__(self, delay: float = 0.0):
        self.log: list[str] = []
        self.delay = delay
        self.live: set[str] = set()

    def load(self, m):
        time.sleep(self.delay)
        self.log.append(f"+{m}")
        self.live.add(m)
        return f"handle-{m}"

    def unload(self, m, handle):
        assert handle == f"handle-{m}"
        self.log.append(f"-{m}")
        self.live.discard(m)


def make(budget, delay=0.0, **need):
    models = Models(delay)
    return Residency(need, budget, models.load, models.unload), models


def test_least_recently_used_is_evicted_first():
    r, models = make(20, a=10, b=10, c=10)
    assert r.fits_alongside(["a", "b", "c"]) == ["a", "b"]
    r.load_now("a")
    r.load_now("b")
    with r.use("a"):  # a is now more recent than b
        pass
    with r.use("c") as hold:  # needs room: b goes, not a
        assert hold.handle == "handle-c" and hold.cold_start_s > 0
    assert models.log == ["+a", "+b", "-b", "+c"]
    assert r.resident == ["a", "c"]
    with r.use("b"):  # a is least recently used now
        pass
    assert models.log[-2:] == ["-a", "+b"]
    assert sum(r.need[m] for m in models.live) <= 20
    assert r.stats["b"].loads == 2 and r.stats["b"].evictions == 1 and r.stats["a"].evictions == 1


def test_a_hot_model_has_no_cold_start():
    r, models = make(None, a=1)
    first = r.acquire("a")
    r.release("a")
    second = r.acquire("a")
    r.release("a")
    assert first.cold_start_s > 0
    assert second.cold_start_s == 0.0
    assert models.log == ["+a"]


def test_a_model_in_use_is_never_evicted():
    r, models = make(10, a=10, b=10)
    held = r.acquire("a")
    got = {}

    def want_b():
        got["hold"] = r.acquire("b")

    t = threading.Thread(target=want_b)
    t.start()
    time.sleep(0.3)
    assert "hold" not in got and models.log == ["+a"]  # b waits: a is running a job
    r.release("a")
    t.join(5)
    assert got["hold"].handle == "handle-b" and models.log == ["+a", "-a", "+b"]
    assert held.handle == "handle-a"
    r.release("b")


def test_concurrent_jobs_for_a_cold_model_load_it_once_and_both_wait_for_it():
    r, models = make(10, delay=0.3, a=5)
    holds = []

    def job():
        with r.use("a") as hold:
            holds.append(hold)

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert models.log == ["+a"]
    assert len(holds) == 4 and all(hold.cold_start_s >= 0.3 for hold in holds)


def test_no_budget_keeps_everything():
    r, models = make(None, a=10**12, b=10**12)
    for m in ("a", "b", "a", "b"):
        with r.use(m):
            pass
    assert models.log == ["+a", "+b"] and sorted(r.resident) == ["a", "b"]


def test_a_failed_load_is_not_retried_until_its_cool_down_has_passed():
    calls, now = [], [100.0]

    def load(m):
        calls.append(m)
        if len(calls) <= 2:
            raise RuntimeError("disk hiccup")
        return "ok"

    r = Residency({"a": 1, "b": 1}, 10, load, lambda m, h: None, retry_load_after_s=60, clock=lambda: now[0])
    with pytest.raises(ModelLoadFailed, match="disk hiccup"):
        r.acquire("a")
    assert r.failed == {"a": "RuntimeError: disk hiccup"}
    with pytest.raises(ModelLoadFailed):  # within the cool-down: refused without loading again
        r.acquire("a")
    assert calls == ["a"]
    now[0] += 61
    assert r.failed == {}
    with pytest.raises(ModelLoadFailed):  # tried again, failed again: the cool-down doubles
        r.acquire("a")
    now[0] += 61
    assert "a" in r.failed
    now[0] += 60
    assert r.acquire("a").handle == "ok" and r.failed == {}
    assert calls == ["a", "a", "a"]


def test_a_model_wanted_out_takes_no_new_jobs_until_the_waiting_load_is_done():
    """A steady stream of jobs for a resident model cannot starve a job for another one."""
    r, models = make(10, a=10, b=10)
    r.acquire("a")  # a job runs on a
    order = []

    def want(m):
        with r.use(m):
            order.append(m)

    tb = threading.Thread(target=want, args=("b",))
    tb.start()
    time.sleep(0.2)  # b waits for a's room
    ta = threading.Thread(target=want, args=("a",))
    ta.start()
    time.sleep(0.2)
    assert order == []  # the new job for a did not jump in front of b
    r.release("a")
    tb.join(5)
    ta.join(5)
    assert order == ["b", "a"]
    assert models.log == ["+a", "-a", "+b", "-b", "+a"]
