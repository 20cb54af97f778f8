"""The cards a worker host can place models on: GPUs found through NVML, sizes declared
by hand (``"80GB,24GB"``), or the CPU counted as one card with a RAM budget.

Pure Python: NVML is read through ``pynvml`` (package ``nvidia-ml-py``) when it is
installed, and torch is never imported, so planning works on a machine with no GPU.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

log = logging.getLogger("vramq.cards")

GB = 10**9
_UNITS = {"": GB, "K": 10**3, "M": 10**6, "G": GB, "T": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT])?(B)?\s*$", re.IGNORECASE)
_COUNT = re.compile(r"^\s*(\d+)\s*[x*]\s*(.+)$", re.IGNORECASE)
CPU_MEMORY_ENV = "VRAMQ_CPU_MEMORY_GB"


@dataclass(frozen=True)
class Card:
    """One device models are placed on."""

    index: int | None
    """CUDA index; None for the CPU "card"."""
    name: str
    """``card0``, ``card1``, ... or ``cpu``."""
    capacity_bytes: int
    model: str = ""
    """What the card is: the NVML name, ``declared`` or ``cpu``."""

    @property
    def capacity_gb(self) -> float:
        return self.capacity_bytes / GB


def parse_size(text: str) -> int:
    """``"80GB"``, ``"24G"``, ``"512MB"``, ``"1.5TB"`` -> bytes (decimal units).

    A bare number is GB: ``"80"`` is 80 GB.
    """
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"bad size {text!r}: expected a number with an optional unit, e.g. 80GB, 24G, 512MB, 1.5TB")
    number, unit, b = m.groups()
    if b and not unit:
        # "80B" is almost surely a typo for 80GB; a card is never sized in bytes.
        raise ValueError(f"bad size {text!r}: give a unit of KB, MB, GB or TB")
    return round(float(number) * _UNITS[(unit or "").upper()])


def parse_cards(spec: str) -> list[Card]:
    """``"80GB,24GB"`` or ``"2x80GB,24GB"`` -> declared cards ``card0``, ``card1``, ..."""
    sizes: list[int] = []
    for part in spec.split(","):
        count, size = 1, part
        if m := _COUNT.match(part):
            count, size = int(m.group(1)), m.group(2)
        try:
            nbytes = parse_size(size)
        except ValueError as e:
            raise ValueError(f"bad card list {spec!r}: {e}") from None
        if nbytes <= 0 or count <= 0:
            raise ValueError(f"bad card list {spec!r}: {part.strip()!r} has no capacity")
        sizes += [nbytes] * count
    return [Card(i, f"card{i}", nbytes, model="declared") for i, nbytes in enumerate(sizes)]


def discover() -> list[Card]:
    """The GPUs NVML sees, in NVML order; ``[]`` when pynvml or the driver is missing.

    NVML numbers cards in PCI bus order, which is CUDA's order when
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
    """
    try:
        import pynvml
    except ImportError:
        log.debug("pynvml is not installed (pip install nvidia-ml-py); no GPUs discovered")
        return []
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as e:
        log.debug("NVML unavailable (%s); no GPUs discovered", e)
        return []
    try:
        cards = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):  # older pynvml returns bytes
                name = name.decode()
            total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            cards.append(Card(i, f"card{i}", total, model=name))
        return cards
    except pynvml.NVMLError as e:
        log.warning("NVML failed while listing GPUs (%s); no GPUs discovered", e)
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def cpu_card(budget_bytes: int | None = None) -> Card:
    """The CPU as one card: ``budget_bytes``, else ``VRAMQ_CPU_MEMORY_GB``, else half the RAM."""
    if budget_bytes is None:
        if env := os.environ.get(CPU_MEMORY_ENV):
            try:
                budget_bytes = parse_size(env)
            except ValueError as e:
                raise ValueError(f"{CPU_MEMORY_ENV}: {e}") from None
        else:
            budget_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return Card(None, "cpu", budget_bytes, model="cpu")


def resolve(spec: str | None, cpu: bool = False) -> list[Card]:
    """The cards to plan for: declared ``spec``, else the CPU when asked, else the GPUs
    NVML finds, else the CPU."""
    if spec:
        return parse_cards(spec)
    if cpu:
        return [cpu_card()]
    return discover() or [cpu_card()]
