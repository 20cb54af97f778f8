"""Requests per minute, per API key and per anonymous client network (429 + ``Retry-After``);
accounts made per network per day.

Counters live in Redis (the broker), through the ``limits`` library's fixed-window
strategy, so every API process shares them. An anonymous caller is its network (an IPv4
address, an IPv6 /64: api.callers.network_of); requests with a wrong API key are counted
per network too, on every path, in a budget of their own. The operator's admin key,
health and metrics endpoints, and signed downloads are not limited. If Redis cannot be reached a request goes through (logged):
the broker being down already refuses new jobs, and reads should keep working. Making an
account does not: it is refused (503) while its limit cannot be counted.
"""

from __future__ import annotations

import logging
import math
import time

from flask import request
from limits import RateLimitItemPerDay, RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from vramq.jobs.accounts import Caller
from vramq.jobs.errors import RateLimited, ServiceUnavailable

log = logging.getLogger("vramq.api")

#: Not counted: probes, the document, downloads through signed links, and the web page's
#: script and style sheet (the page itself, ``/``, is counted).
EXEMPT_PREFIXES = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/blobs/", "/web/")


class RateLimiter:
    def __init__(self, redis_url: str, anonymous_per_min: int, keyed_per_min: int, accounts_per_day: int = 0):
        self.anonymous = RateLimitItemPerMinute(anonymous_per_min) if anonymous_per_min else None
        self.keyed = RateLimitItemPerMinute(keyed_per_min) if keyed_per_min else None
        self.accounts = RateLimitItemPerDay(accounts_per_day) if accounts_per_day else None
        self.limiter = FixedWindowRateLimiter(storage_from_string(redis_url))

    def check(self, caller: Caller) -> None:
        if caller.admin or request.path.startswith(EXEMPT_PREFIXES):
            return
        item = self.keyed if caller.keyed else self.anonymous
        if item is None:
            return
        try:
            allowed = self.limiter.hit(item, "vramq", caller.id)
            if allowed:
                return
            reset = self.limiter.get_window_stats(item, "vramq", caller.id).reset_time
        except Exception as exc:  # Redis unreachable: fail open, say so
            log.warning("rate limit not checked (%s: %s)", exc.__class__.__name__, exc)
            return
        who = "this API key" if caller.keyed else "this address without an API key"
        setting = "VRAMQ_RATE_LIMIT_KEYED" if caller.keyed else "VRAMQ_RATE_LIMIT_ANONYMOUS"
        raise RateLimited(
            f"more than {item.amount} requests a minute from {who} (limit {setting}); try again shortly",
            retry_after=math.ceil(reset - time.time()),
        )

    # Wrong API keys: counted per network, as many a minute as anonymous requests, on
    # every path, in a budget of their own (so a network's anonymous requests do not
    # lock out its keyed callers).

    def wrong_key(self, network: str) -> None:
        """Count a wrong Authorization header from ``network`` (429 once past the limit)."""
        self._wrong_keys(network, count=True)

    def refuse_if_wrong_keys_spent(self, network: str) -> None:
        """429, without counting, when ``network`` has sent its minute's worth of wrong
        keys: an unverified key from it is then not even looked up."""
        self._wrong_keys(network, count=False)

    def _wrong_keys(self, network: str, count: bool) -> None:
        item = self.anonymous
        if item is None:
            return
        try:
            allowed = (self.limiter.hit if count else self.limiter.test)(item, "vramq-wrong-key", network)
            if allowed:
                return
            reset = self.limiter.get_window_stats(item, "vramq-wrong-key", network).reset_time
        except Exception as exc:  # Redis unreachable: fail open, say so
            log.warning("wrong-key limit not checked (%s: %s)", exc.__class__.__name__, exc)
            return
        raise RateLimited(
            f"more than {item.amount} requests a minute with a wrong API key from this address "
            "(limit VRAMQ_RATE_LIMIT_ANONYMOUS); try again shortly",
            retry_after=math.ceil(reset - time.time()),
        )

    def count_account(self, network: str) -> None:
        """Count one account made from ``network`` today (429 past ``VRAMQ_ACCOUNTS_PER_DAY``;
        503 when Redis cannot count it: accounts are not handed out uncounted)."""
        if self.accounts is None:
            return
        try:
            if self.limiter.hit(self.accounts, "vramq-accounts", network):
                return
            reset = self.limiter.get_window_stats(self.accounts, "vramq-accounts", network).reset_time
        except Exception as exc:
            log.warning("account limit not counted (%s: %s)", exc.__class__.__name__, exc)
            refused = ServiceUnavailable(
                "accounts cannot be made now: their limit cannot be counted (broker unreachable)"
            )
            refused.retry_after = 30
            raise refused from exc
        raise RateLimited(
            f"at most {self.accounts.amount} accounts a day from one network (an IPv4 address or an "
            f"IPv6 /64; limit VRAMQ_ACCOUNTS_PER_DAY)",
            retry_after=math.ceil(reset - time.time()),
        )
