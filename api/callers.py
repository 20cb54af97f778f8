"""Who is calling: an account (``Authorization: Bearer <key>``), the operator (the admin
key from ``VRAMQ_ADMIN_KEY``), or an anonymous client identified by its address.

A header that is present but wrong is 401, never a silent fall-back to anonymous: a
client with a mistyped key should learn it at once, not after spending the anonymous
allowance. Wrong keys are rate limited per network (api.ratelimit); once a network has
sent its minute's worth, a key from it is not even looked up (429) unless this process
verified it recently, so guessing keys costs the database nothing while the keys in use
behind the same address keep working.

Anonymous callers are known by their *network*: an IPv4 address, or the /64 an IPv6
address is in (one subscriber's allocation; counting each of its 2**64 addresses as a
caller of its own would be an endless supply of allowances).
"""

from __future__ import annotations

import hmac
import ipaddress
import threading
import time
from collections import OrderedDict

from flask import current_app, g, request

from vramq.jobs.accounts import Caller, by_key, caller_for, hash_key
from vramq.jobs.errors import Forbidden, Unauthorized

#: The prefix length an IPv6 client is known by (its subscriber's /64).
IPV6_PREFIX = 64

ADMIN = Caller(id="admin", tier="admin", admin=True)


def client_address() -> str:
    """The client's address; ``X-Forwarded-For`` is believed only from configured proxies."""
    remote = request.remote_addr or "unknown"
    trusted = current_app.config["VRAMQ"].settings.trusted_proxies
    if not trusted or not _in(remote, trusted):
        return remote
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    # Walk from the nearest hop back; the first address that is not a trusted proxy is the client.
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop
    return hops[0] if hops else remote


def network_of(address: str) -> str:
    """What a client address counts as in allowances and limits: an IPv4 address itself
    (also when written IPv4-mapped, ``::ffff:a.b.c.d``), an IPv6 address its /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]  # not an address ("unknown", a proxy's odd hop): as it is
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{IPV6_PREFIX}", strict=False))
    return str(ip)


def anonymous_caller() -> Caller:
    """The request's caller as if it had no key: its network."""
    return Caller.anonymous(network_of(client_address()))


def _in(addr: str, networks: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def current_caller() -> Caller:
    """The request's caller, resolved once per request."""
    if "caller" not in g:
        g.caller = _resolve()
    return g.caller


def _resolve() -> Caller:
    header = request.headers.get("Authorization")
    if header is None:
        return anonymous_caller()
    limiter = current_app.extensions.get("vramq.limiter")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        _failed(limiter)
        raise Unauthorized("the Authorization header must be 'Bearer <api key>'")
    services = current_app.config["VRAMQ"]
    admin_key = services.settings.admin_key
    if admin_key and hmac.compare_digest(key.encode("utf-8", "replace"), admin_key.encode()):
        return ADMIN
    digest = hash_key(key)
    if limiter is not None and not _verified.recent(digest):
        limiter.refuse_if_wrong_keys_spent(network_of(client_address()))  # 429 before any lookup
    with services.sessions() as session:
        account = by_key(session, key)
    if account is None:
        _failed(limiter)
        raise Unauthorized("unknown API key")
    _verified.add(digest)
    return caller_for(account)


def _failed(limiter) -> None:
    """Count a wrong Authorization header against its network (429 once past the limit)."""
    if limiter is not None:
        limiter.wrong_key(network_of(client_address()))


class _Verified:
    """Hashes of keys this process found in the database lately: they are looked up even
    while their network is refused for wrong keys (a neighbour behind the same NAT
    guessing keys must not lock out the keys in use there)."""

    TTL_S = 600.0
    MAX = 10_000

    def __init__(self):
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, digest: str) -> None:
        with self._lock:
            self._seen[digest] = time.monotonic()
            self._seen.move_to_end(digest)
            while len(self._seen) > self.MAX:
                self._seen.popitem(last=False)

    def recent(self, digest: str) -> bool:
        with self._lock:
            seen = self._seen.get(digest)
        return seen is not None and time.monotonic() - seen < self.TTL_S


_verified = _Verified()


def require_account(what: str) -> Caller:
    """The caller, who must have an API key (401 otherwise)."""
    caller = current_caller()
    if not (caller.keyed or caller.admin):
        raise Unauthorized(f"{what} needs an API key (Authorization: Bearer …); POST /v1/accounts makes one")
    return caller


def require_admin() -> Caller:
    caller = current_caller()
    if caller.admin:
        return caller
    if current_app.config["VRAMQ"].settings.admin_key is None:
        raise Forbidden("the admin API is off: this server has no VRAMQ_ADMIN_KEY")
    if not caller.keyed:
        raise Unauthorized("this call needs the admin key (Authorization: Bearer <VRAMQ_ADMIN_KEY>)")
    raise Forbidden("this call needs the admin key; an account's key is not enough")
