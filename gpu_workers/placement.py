"""Placement: which models go on which cards, decided before any model is loaded.

Pure Python over byte counts (a model's VRAM demand, a card's capacity), so a plan can
be computed and shown on a machine with no GPU. ``plan`` works in four passes:

1. Resident pass. Models, largest first (ties by id, so a plan is deterministic), each
   go to the card where they fit in the free space left with the *least* free space
   afterwards (best fit; ties go to the earlier card). Big models are placed while
   room is plentiful, and small ones fill the gaps instead of breaking up an empty
   card. Resident models never fill a card past its capacity.
2. Replica pass (``replicas=True``). In the same order, each model placed in pass 1
   gets a second resident copy on another card, never its first card, where it still
   fits, best fit again. Models without room stay single.
3. On-demand pass (``on_demand=True``). A model that found no room in pass 1 but would
   fit an empty card is placed *on demand* (``resident=False``) on the largest card
   that could hold it alone (ties: the card with fewest on-demand models, then the
   earlier card). At run time that card's worker loads it when a job needs it and
   evicts least-recently-used models to make room.
4. Anything left is unplaced, with a reason that gives the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .cards import GB, Card

if TYPE_CHECKING:
    from rich.table import Table


@dataclass(frozen=True)
class Demand:
    """A model to place and the VRAM it needs."""

    id: str
    vram_bytes: int


@dataclass
class Placed:
    """One copy of a model on a card."""

    id: str
    vram_bytes: int
    resident: bool
    """True: loaded alongside the card's other resident models. False: on demand, loaded
    when a job needs it, evicting the least recently used models."""
    replica: int = 0
    """0 for the first copy, 1 for the second."""


@dataclass
class CardPlan:
    card: Card
    models: list[Placed] = field(default_factory=list)

    @property
    def resident_bytes(self) -> int:
        return sum(p.vram_bytes for p in self.models if p.resident)

    @property
    def free_bytes(self) -> int:
        """Capacity not taken by resident models (never negative)."""
        return max(0, self.card.capacity_bytes - self.resident_bytes)


def _gb(nbytes: int) -> float:
    return round(nbytes / GB, 2)


@dataclass
class Plan:
    cards: list[CardPlan]
    unplaced: list[tuple[str, int, str]]
    """(model id, vram bytes, reason) for each model with no copy anywhere."""

    def models_on(self, card_name: str) -> list[str]:
        """Ids of the models on a card, resident and on demand."""
        for cp in self.cards:
            if cp.card.name == card_name:
                return [p.id for p in cp.models]
        raise KeyError(f"no card named {card_name!r} in this plan")

    def to_json(self) -> dict:
        return {
            "cards": [
                {
                    "card": cp.card.name,
                    "capacity_gb": _gb(cp.card.capacity_bytes),
                    "models": [
                        {"id": p.id, "vram_gb": _gb(p.vram_bytes), "resident": p.resident, "replica": p.replica}
                        for p in cp.models
                    ],
                    "free_gb": _gb(cp.free_bytes),
                }
                for cp in self.cards
            ],
            "unplaced": [
                {"id": id_, "vram_gb": _gb(nbytes), "reason": reason} for id_, nbytes, reason in self.unplaced
            ],
        }

    def table(self) -> Table:
        """The plan as a rich table: each card's models and free space, then the unplaced."""
        from rich.table import Table

        table = Table("card", "model", "GB", "placement")
        table.columns[2].justify = "right"
        for cp in self.cards:
            what = f"{cp.card.capacity_gb:.1f} GB" + (f" {cp.card.model}" if cp.card.model else "")
            label = f"{cp.card.name}\n[dim]{what}[/dim]"
            for p in cp.models:
                how = "on demand" if not p.resident else "replica" if p.replica else "resident"
                table.add_row(label, p.id, f"{p.vram_bytes / GB:.2f}", how)
                label = ""
            table.add_row(label, "[dim]free[/dim]", f"{cp.free_bytes / GB:.2f}", "")
            table.add_section()
        for id_, nbytes, reason in self.unplaced:
            table.add_row("[red]unplaced[/red]", id_, f"{nbytes / GB:.2f}", reason)
        return table


def _best_fit(cards: list[CardPlan], need: int) -> CardPlan | None:
    """The card where ``need`` fits with the least free space left after it."""
    fits = [cp for cp in cards if cp.free_bytes >= need]
    return min(fits, key=lambda cp: cp.free_bytes - need, default=None)


def plan(demands: list[Demand], cards: list[Card], *, replicas: bool = True, on_demand: bool = True) -> Plan:
    """Place ``demands`` on ``cards``; see the module docstring for the passes."""
    ids = [d.id for d in demands]
    if len(set(ids)) != len(ids):
        raise ValueError(f"model ids must be unique, got {sorted(ids)}")
    if any(d.vram_bytes < 0 for d in demands):
        raise ValueError("a model's vram_bytes cannot be negative")
    if len({c.name for c in cards}) != len(cards):
        raise ValueError(f"card names must be unique, got {[c.name for c in cards]}")

    plans = [CardPlan(card) for card in cards]
    order = sorted(demands, key=lambda d: (-d.vram_bytes, d.id))
    if not plans:
        return Plan([], [(d.id, d.vram_bytes, "no cards") for d in order])

    first: dict[str, CardPlan] = {}
    most_free: dict[str, int] = {}  # for the reason: the best room a model was offered
    for d in order:
        most_free[d.id] = max(cp.free_bytes for cp in plans)
        if cp := _best_fit(plans, d.vram_bytes):
            cp.models.append(Placed(d.id, d.vram_bytes, resident=True))
            first[d.id] = cp

    if replicas:
        for d in order:
            if d.id in first:
                others = [cp for cp in plans if cp is not first[d.id]]
                if cp := _best_fit(others, d.vram_bytes):
                    cp.models.append(Placed(d.id, d.vram_bytes, resident=True, replica=1))

    unplaced: list[tuple[str, int, str]] = []
    largest = max(c.capacity_bytes for c in cards)
    for d in order:
        if d.id in first:
            continue
        if d.vram_bytes > largest:
            reason = f"needs {d.vram_bytes / GB:.1f} GB; the largest card has {largest / GB:.1f} GB"
        elif on_demand:
            n_on_demand = {id(cp): sum(not p.resident for p in cp.models) for cp in plans}
            cp = min(
                (cp for cp in plans if cp.card.capacity_bytes >= d.vram_bytes),
                key=lambda cp: (-cp.card.capacity_bytes, n_on_demand[id(cp)]),
            )
            cp.models.append(Placed(d.id, d.vram_bytes, resident=False))
            continue
        else:
            reason = (
                f"needs {d.vram_bytes / GB:.1f} GB; at most {most_free[d.id] / GB:.1f} GB "
                "is free on any card after larger models were placed"
            )
        unplaced.append((d.id, d.vram_bytes, reason))
    return Plan(plans, unplaced)
