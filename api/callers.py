"""Who is calling: an account (``Authorization: Bearer <key>``), the operator (the admin
key from ``VRAMQ_ADMIN_KEY``), or an anonymous client identified by its address.

A header that is present but wrong is 401, never a silent fall-back to anonymous: a
client with a mistyped key should learn it at once, not after spending the anonymous
allowance.
"""

from __future__ import annotations

import hmac
import ipaddress

from flask import current_app, g, request

from jobs.accounts import Caller, by_key, caller_for
from jobs.errors import Forbidden, Unauthorized

ADMIN = Caller(holder="admin", tier="admin", admin=True)


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
        return Caller.anonymous(client_address())
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized("the Authorization header must be 'Bearer <api key>'")
    services = current_app.config["VRAMQ"]
    admin_key = services.settings.admin_key
    if admin_key and hmac.compare_digest(key.encode(), admin_key.encode()):
        return ADMIN
    with services.sessions() as session:
        account = by_key(session, key)
    if account is None:
        raise Unauthorized("unknown API key")
    return caller_for(account)


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
