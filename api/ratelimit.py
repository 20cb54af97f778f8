"""Requests per minute, per API key and per anonymous client address (429 + ``Retry-After``).

Counters live in Redis (the broker), through the ``limits`` library's fixed-window
strategy, so every API process shares them. The operator's admin key, health and
metrics endpoints, and signed downloads are not limited. If Redis cannot be reached the
request goes through (logged): the broker being down already refuses new jobs, and
reads should keep working.
"""

from __future__ import annotations

import logging
import math
import time

from flask import request
from limits import RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from jobs.accounts import Caller
from jobs.errors import RateLimited

log = logging.getLogger("vramq.api")

EXEMPT_PREFIXES = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/blobs/")


class RateLimiter:
    def __init__(self, redis_url: str, anonymous_per_min: int, keyed_per_min: int):
        self.anonymous = RateLimitItemPerMinute(anonymous_per_min) if anonymous_per_min else None
        self.keyed = RateLimitItemPerMinute(keyed_per_min) if keyed_per_min else None
        self.limiter = FixedWindowRateLimiter(storage_from_string(redis_url))

    def check(self, caller: Caller) -> None:
        if caller.admin or request.path.startswith(EXEMPT_PREFIXES):
            return
        item = self.keyed if caller.keyed else self.anonymous
        if item is None:
            return
        try:
            allowed = self.limiter.hit(item, "vramq", caller.holder)
            if allowed:
                return
            reset = self.limiter.get_window_stats(item, "vramq", caller.holder).reset_time
        except Exception as exc:  # Redis unreachable: fail open, say so
            log.warning("rate limit not checked (%s: %s)", exc.__class__.__name__, exc)
            return
        who = "this API key" if caller.keyed else "this address without an API key"
        raise RateLimited(f"more than {item.amount} requests a minute from {who}; try again shortly",
                          retry_after=math.ceil(reset - time.time()))
