"""What a job costs, in tokens, from the GPU-seconds it takes.

Rules (also in docs/tokens.md):

* **Rate.** A model's price is ``tokens_per_gpu_second`` from its catalog entry. Without
  one, the rate follows the VRAM the model ties up: ``RATE_PER_GB`` (10) tokens per
  GPU-second per GB of the planner's estimate, so a 40 GB FLUX costs 4x a 10 GB model
  for the same second. A GPU-second is the job's share of its batch's wall time: a
  batch of four images that took 2 s bills 0.5 s to each (the batcher splits by cost;
  vLLM bills each request its share of the engine steps it was part of).
* **Charge.** ``max(min_tokens, ceil(gpu_seconds x rate))``; ``min_tokens`` defaults
  to 100. Failed jobs are not charged.
* **Estimate (the reservation).** Before a job runs its cost is estimated from its
  input as ``units x seconds_per_unit x rate``, where units are the input's work:
  prompt + ``max_tokens`` tokens (text), megapixels x steps x images (image),
  megapixels x steps x frames (video), seconds of audio (speech). ``seconds_per_unit``
  is calibrated from the model's recent successful runs (the 90th percentile of
  their GPU-seconds per unit over the last 50, once there are 5), so a reservation
  usually covers the actual cost; before that it is the catalog's prior, or the
  per-kind default below (figures of the seeds' H100 class).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from .schema import Job
from .vram import estimate_entry

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from .catalog import ModelEntry

log = logging.getLogger("vramq.pricing")

#: Default price: tokens per GPU-second per GB (10^9 bytes) of the model's VRAM need.
RATE_PER_GB = 10.0
#: Used when a model's VRAM cannot be estimated (its weights are not readable here).
FALLBACK_RATE = 100.0
#: GPU-seconds per unit of work before a model has history (see ``work_units``).
PRIOR_SECONDS_PER_UNIT = {"text": 0.02, "image": 0.1, "video": 0.15, "speech": 0.05}
CALIBRATION_WINDOW = 50
CALIBRATION_MIN_SAMPLES = 5
CALIBRATION_QUANTILE = 0.9
CALIBRATION_CACHE_S = 30.0


def charge(gpu_seconds: float, rate: float, min_tokens: int) -> int:
    """Tokens for ``gpu_seconds`` at ``rate``, never below ``min_tokens``."""
    return max(min_tokens, math.ceil(round(gpu_seconds * rate, 6)))


def work_units(
    kind: str, inp: dict[str, Any], *, prompt_tokens: int | None = None, audio_seconds: float | None = None
) -> float:
    """The amount of work in a job's input, in the kind's unit (see the module doc)."""
    if kind == "text":
        return float((prompt_tokens or 0) + inp["max_tokens"])
    if kind == "image":
        return float(inp["width"] * inp["height"] / 1e6 * inp["steps"] * inp.get("num_images", 1))
    if kind == "video":
        return float(inp["width"] * inp["height"] / 1e6 * inp["steps"] * inp["num_frames"])
    if kind == "speech":
        return float(audio_seconds or 0.0)
    raise ValueError(f"unknown kind {kind!r}")


def rate_for(entry: ModelEntry) -> float:
    """Tokens per GPU-second: the catalog's price, else from the model's VRAM need."""
    if entry.price.tokens_per_gpu_second is not None:
        return entry.price.tokens_per_gpu_second
    need = vram_need_bytes(entry)
    return FALLBACK_RATE if need is None else max(1.0, round(RATE_PER_GB * need / 1e9, 2))


_needs: dict[tuple[str, str], int | None] = {}


def vram_need_bytes(entry: ModelEntry) -> int | None:
    """The planner's estimate for the entry, computed without torch (weights' headers or
    an LLM's config), once per process; None when the weights are not readable here."""
    key = (entry.id, str(entry.weights))
    if key not in _needs:
        try:
            _needs[key] = estimate_entry(entry).total_bytes
        except Exception as exc:
            log.warning(
                "no VRAM estimate for %s (%s); its default price is %s tokens/GPU-s", entry.id, exc, FALLBACK_RATE
            )
            _needs[key] = None
    return _needs[key]


@dataclass(frozen=True)
class Quote:
    """A job's price, fixed at submit."""

    rate: float
    min_tokens: int
    units: float
    seconds_per_unit: float
    tokens: int
    """The reservation: the estimated charge."""


class Estimator:
    """Quotes jobs, with each model's GPU-seconds per unit calibrated from recent runs."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions
        self._cache: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def quote(self, entry: ModelEntry, units: float) -> Quote:
        rate = rate_for(entry)
        spu = self.seconds_per_unit(entry)
        return Quote(
            rate=rate,
            min_tokens=entry.price.min_tokens,
            units=units,
            seconds_per_unit=spu,
            tokens=charge(units * spu, rate, entry.price.min_tokens),
        )

    def seconds_per_unit(self, entry: ModelEntry) -> float:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(entry.id)
        if hit is not None and now - hit[1] < CALIBRATION_CACHE_S:
            return hit[0]
        value = self.calibrate(entry)
        with self._lock:
            self._cache[entry.id] = (value, now)
        return value

    def calibrate(self, entry: ModelEntry) -> float:
        """The quantile of recent GPU-seconds per unit, or the prior without enough history."""
        prior = entry.price.seconds_per_unit or PRIOR_SECONDS_PER_UNIT[entry.kind]
        with self.sessions() as session:
            rows = session.execute(
                select(Job.gpu_seconds, Job.work_units)
                .where(Job.model == entry.id, Job.status == "succeeded", Job.work_units > 0, Job.gpu_seconds > 0)
                .order_by(Job.finished_at.desc())
                .limit(CALIBRATION_WINDOW)
            ).all()
        ratios = sorted(g / u for g, u in rows)
        if len(ratios) < CALIBRATION_MIN_SAMPLES:
            return prior
        return ratios[min(len(ratios) - 1, math.ceil(CALIBRATION_QUANTILE * len(ratios)) - 1)]
