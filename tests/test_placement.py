"""Cards (sizes, NVML discovery, the CPU card) and the placement of models on them."""

from __future__ import annotations

import os
import random
import sys
import types

import pytest
from rich.console import Console

from vramq.gpu_workers.cards import Card, cpu_card, discover, parse_cards, parse_size, resolve
from vramq.gpu_workers.placement import CardPlan, Demand, Placed, Plan, plan

G = 10**9


def cards(*gbs: float) -> list[Card]:
    return [Card(i, f"card{i}", int(gb * G), model="declared") for i, gb in enumerate(gbs)]


def demands(**gbs: float) -> list[Demand]:
    return [Demand(id_, int(gb * G)) for id_, gb in gbs.items()]


def where(p: Plan) -> dict[tuple[str, int], tuple[str, bool]]:
    """(model id, replica) -> (card name, resident)."""
    return {(m.id, m.replica): (cp.card.name, m.resident) for cp in p.cards for m in cp.models}


# --- cards -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, nbytes",
    [
        ("80GB", 80 * G),
        ("24G", 24 * G),
        ("80", 80 * G),
        ("80gb", 80 * G),
        (" 12.5 GB ", 12_500_000_000),
        ("1.5TB", 1_500 * G),
        ("512MB", 512 * 10**6),
        ("2.01GB", 2_010_000_000),
    ],
)
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "GB", "abc", "-5GB", "80 GiB", "80B", "1e3", "80GB extra"])
def test_parse_size_rejects_with_a_clear_message(text):
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


def test_parse_cards():
    assert parse_cards("80GB,24GB") == [
        Card(0, "card0", 80 * G, model="declared"),
        Card(1, "card1", 24 * G, model="declared"),
    ]
    assert [(c.name, c.capacity_gb) for c in parse_cards("2x80GB, 24G")] == [
        ("card0", 80.0),
        ("card1", 80.0),
        ("card2", 24.0),
    ]


@pytest.mark.parametrize("spec", ["80GB,", "80GB,xyz", "0x80GB", "0GB", "2x"])
def test_parse_cards_rejects(spec):
    with pytest.raises(ValueError, match="bad card list"):
        parse_cards(spec)


def test_discover_returns_a_list_without_raising():
    found = discover()
    assert isinstance(found, list)
    assert all(isinstance(c, Card) and c.capacity_bytes > 0 for c in found)
    assert [c.index for c in found] == list(range(len(found)))


class FakeNVML(types.ModuleType):
    """Just enough of pynvml for discover(): two cards, or an nvmlInit that fails."""

    class NVMLError(Exception):
        pass

    def __init__(self, init_fails: bool = False):
        super().__init__("pynvml")
        self.init_fails, self.calls = init_fails, []

    def nvmlInit(self):
        self.calls.append("init")
        if self.init_fails:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return [b"NVIDIA A10", "NVIDIA H100 80GB HBM3"][h]  # older pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(total=[24 * 2**30, 80 * 2**30][h])


def test_discover_reads_nvml(monkeypatch):
    nvml = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert discover() == [
        Card(0, "card0", 24 * 2**30, model="NVIDIA A10"),
        Card(1, "card1", 80 * 2**30, model="NVIDIA H100 80GB HBM3"),
    ]
    assert nvml.calls == ["init", "shutdown"]

    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(init_fails=True))
    assert discover() == []
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert discover() == []


def test_cpu_card(monkeypatch):
    monkeypatch.setenv("VRAMQ_CPU_MEMORY_GB", "12")
    assert cpu_card() == Card(None, "cpu", 12 * G, model="cpu")
    assert cpu_card(5 * G).capacity_bytes == 5 * G  # an explicit budget wins
    monkeypatch.setenv("VRAMQ_CPU_MEMORY_GB", "lots")
    with pytest.raises(ValueError, match="VRAMQ_CPU_MEMORY_GB"):
        cpu_card()
    monkeypatch.delenv("VRAMQ_CPU_MEMORY_GB")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert cpu_card().capacity_bytes == ram // 2


def test_resolve(monkeypatch):
    monkeypatch.setenv("VRAMQ_CPU_MEMORY_GB", "7")
    assert [c.name for c in resolve("80GB,24GB", cpu=True)] == ["card0", "card1"]
    assert resolve(None, cpu=True) == [Card(None, "cpu", 7 * G, model="cpu")]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML())
    assert [c.model for c in resolve(None)] == ["NVIDIA A10", "NVIDIA H100 80GB HBM3"]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(init_fails=True))  # no driver
    assert resolve(None) == [Card(None, "cpu", 7 * G, model="cpu")]


# --- placement -------------------------------------------------------------------------


def test_largest_first_best_fit():
    # Largest first, best fit:  a 40 -> card1 (8 left, not card0's 40);  b 30 -> card0 (50);
    # c 20 -> card2 (4 left, not card0's 30);  d 16 -> card0 (34);  e 10 -> card0 (24).
    # Given in the opposite order, or with first fit, a would land on card0.
    p = plan(demands(e=10, d=16, c=20, b=30, a=40), cards(80, 48, 24), replicas=False)
    assert where(p) == {
        ("a", 0): ("card1", True),
        ("b", 0): ("card0", True),
        ("c", 0): ("card2", True),
        ("d", 0): ("card0", True),
        ("e", 0): ("card0", True),
    }
    assert p.models_on("card0") == ["b", "d", "e"]
    assert [cp.free_bytes for cp in p.cards] == [24 * G, 8 * G, 4 * G]
    assert p.unplaced == []


def test_equal_sizes_place_in_id_order():
    p = plan(demands(b=40, a=40), cards(40, 40))
    assert p.models_on("card0") == ["a"] and p.models_on("card1") == ["b"]


def test_second_replica_only_where_room_is_left():
    # After the resident pass of the example above, card0 has 24 GB, card1 8, card2 4:
    # only c (20 GB, first copy on card2) fits a second time, on card0.
    p = plan(demands(e=10, d=16, c=20, b=30, a=40), cards(80, 48, 24))
    replicas = {k[0]: v for k, v in where(p).items() if k[1] == 1}
    assert replicas == {"c": ("card0", True)}
    assert p.cards[0].free_bytes == 4 * G

    assert where(plan(demands(m=30), cards(80, 80)))[("m", 1)] == ("card1", True)
    assert ("m", 1) not in where(plan(demands(m=30), cards(80, 24)))
    assert ("m", 1) not in where(plan(demands(m=30), cards(80)))  # never twice on one card
    assert ("m", 1) not in where(plan(demands(m=30), cards(80, 80), replicas=False))


def test_bigger_than_every_card_is_unplaced_with_the_numbers():
    p = plan(demands(small=10, huge=174.5), cards(80, 24))
    assert p.unplaced == [("huge", int(174.5 * G), "needs 174.5 GB; the largest card has 80.0 GB")]
    assert ("small", 0) in where(p) and ("huge", 0) not in where(p)


def test_no_room_left_without_on_demand():
    p = plan(demands(x=67.5, y=30), cards(80), on_demand=False)
    assert p.models_on("card0") == ["x"]
    assert p.unplaced == [
        ("y", 30 * G, "needs 30.0 GB; at most 12.5 GB is free on any card after larger models were placed")
    ]


def test_on_demand_when_models_fit_alone_but_not_together():
    # big 60 -> card0; mid 50 fits neither card's free space (20, 24) but fits card0
    # alone, the largest card; small 20 fits best on card0 (0 left).
    p = plan(demands(small=20, mid=50, big=60), cards(80, 24), replicas=False)
    assert p.cards[0].models == [
        Placed("big", 60 * G, True),
        Placed("small", 20 * G, True),
        Placed("mid", 50 * G, False),
    ]
    assert p.cards[0].resident_bytes == 80 * G and p.unplaced == []

    # Between equally large cards, the one with fewer on-demand models.
    p = plan(demands(a=20, b=20, c=15, d=15), cards(24, 24), replicas=False)
    assert where(p) == {
        ("a", 0): ("card0", True),
        ("b", 0): ("card1", True),
        ("c", 0): ("card0", False),
        ("d", 0): ("card1", False),
    }


def test_free_bytes_never_negative():
    cp = CardPlan(cards(24)[0], [Placed("a", 20 * G, True), Placed("b", 20 * G, True)])
    assert cp.resident_bytes == 40 * G and cp.free_bytes == 0


def test_no_cards():
    p = plan(demands(a=1, b=2), [])
    assert p.cards == [] and p.unplaced == [("b", 2 * G, "no cards"), ("a", G, "no cards")]


def test_rejects_duplicate_ids():
    with pytest.raises(ValueError, match="unique"):
        plan([Demand("a", G), Demand("a", 2 * G)], cards(80))


@pytest.mark.parametrize("replicas, on_demand", [(True, True), (False, True), (True, False)])
def test_random_plans_keep_the_invariants(replicas, on_demand):
    rng = random.Random(20240611)
    for _ in range(400):
        cs = cards(*rng.choices([8, 12, 16, 24, 40, 48, 80], k=rng.randint(0, 4)))
        ds = [Demand(f"m{i}", rng.randint(1, 100_000) * 10**6) for i in range(rng.randint(0, 12))]
        p = plan(ds, cs, replicas=replicas, on_demand=on_demand)
        largest = max((c.capacity_bytes for c in cs), default=0)

        for cp in p.cards:
            assert sum(m.vram_bytes for m in cp.models if m.resident) <= cp.card.capacity_bytes
            assert all(m.vram_bytes <= cp.card.capacity_bytes for m in cp.models)
        copies = [(m.id, m.replica, m.resident, cp.card.name) for cp in p.cards for m in cp.models]
        unplaced = [u[0] for u in p.unplaced]
        for d in ds:
            firsts = [c for c in copies if c[0] == d.id and c[1] == 0]
            seconds = [c for c in copies if c[0] == d.id and c[1] == 1]
            assert len(firsts) + unplaced.count(d.id) == 1, (d, p)
            assert len(seconds) <= 1
            if seconds:
                assert replicas and firsts[0][2] and seconds[0][2]  # replicas are resident
                assert seconds[0][3] != firsts[0][3]
            if on_demand and d.id in unplaced:
                assert d.vram_bytes > largest
            if firsts and not firsts[0][2]:
                assert on_demand
        assert sorted(p.unplaced, key=lambda u: (-u[1], u[0])) == p.unplaced


# --- output ----------------------------------------------------------------------------


def test_to_json_shape():
    p = plan(demands(a=12.346, b=70, c=100), cards(80, 24))
    assert p.to_json() == {
        "cards": [
            {
                "card": "card0",
                "capacity_gb": 80.0,
                "free_gb": 10.0,
                "models": [{"id": "b", "vram_gb": 70.0, "resident": True, "replica": 0}],
            },
            {
                "card": "card1",
                "capacity_gb": 24.0,
                "free_gb": 11.65,
                "models": [{"id": "a", "vram_gb": 12.35, "resident": True, "replica": 0}],
            },
        ],
        "unplaced": [{"id": "c", "vram_gb": 100.0, "reason": "needs 100.0 GB; the largest card has 80.0 GB"}],
    }


def test_table_prints():
    p = plan(demands(llm=60, sdxl=30, whisper=8, huge=174.5), cards(80, 24))
    console = Console(record=True, width=120)
    console.print(p.table())
    text = console.export_text()
    for needle in [
        "card0",
        "card1",
        "llm",
        "sdxl",
        "whisper",
        "huge",
        "on demand",
        "free",
        "unplaced",
        "needs 174.5 GB; the largest card has 80.0 GB",
    ]:
        assert needle in text, needle
