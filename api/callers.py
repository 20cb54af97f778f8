"""Who is calling. Accounts and keys arrive with the accounts work; until then every
caller is anonymous and identified by client address."""

from __future__ import annotations

import ipaddress

from flask import current_app, request


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


def idempotency_scope() -> str:
    return f"anon:{client_address()}"
