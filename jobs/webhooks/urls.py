"""The SSRF guard: one strict parser for webhook URLs (``parse_url``), and the check that
every address a URL reaches is public (``check_url``), which pins the URL to the
addresses it judged (``Target``) for the sender."""

from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ..errors import InputError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolve = Callable[..., Sequence[tuple[Any, ...]]]
"""How a host name is resolved: ``socket.getaddrinfo``'s signature (a seam for tests)."""


class BadURL(ValueError):
    """A URL the guard refuses; its text is the message of the 422."""


@dataclass(frozen=True)
class ParsedURL:
    """A webhook URL read by the one parser (``parse_url``) both the submit check and the
    sender use: nothing else ever reads the URL's host."""

    scheme: str
    host: str
    """ASCII, lower case: an IDNA-encoded name, or an IP address's text (IPv6 without brackets)."""
    port: int
    path: str
    """The request target: path and query, percent-encoded ASCII, never empty."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    """The address when the host is an IP literal (then nothing is resolved)."""

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.scheme == "https" else 80) else f"{host}:{self.port}"


@dataclass(frozen=True)
class Target(ParsedURL):
    """A checked URL pinned to the addresses it was checked against: the sender connects
    to ``ips`` (in order) and sends ``host_header`` and, for https, SNI and the certificate
    check for ``host``; no later parse or DNS answer can move it."""

    ips: tuple[str, ...] = ()


_SCHEME = re.compile(r"(https?)://", re.IGNORECASE)
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_IPV4_PART = re.compile(r"0|[1-9][0-9]{0,2}")
_HEX = re.compile(r"0x[0-9a-f]*")
_PATH_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))
"""Printable ASCII stays as written in a path; anything else is percent-encoded."""


def parse_url(url: str) -> ParsedURL:
    """Read a webhook URL strictly, refusing (``BadURL``) whatever two URL parsers could
    read differently: backslashes, user information, control characters, whitespace,
    percent-encoded or empty hosts, ports outside 1-65535, invalid IDNA, trailing dots,
    and numeric host shorthands (``2130706433``, ``0x7f.1``, ``127.1``)."""
    if not isinstance(url, str):
        raise BadURL("must be a string")
    for ch in url:
        if ch == "\\":
            raise BadURL("must not contain a backslash")
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
            raise BadURL(f"must not contain whitespace or control characters (found U+{ord(ch):04X})")
    m = _SCHEME.match(url)
    if not m:
        raise BadURL("must be an http:// or https:// URL with a host")
    scheme, rest = m.group(1).lower(), url[m.end() :]
    end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0] or [len(rest)])
    authority, tail = rest[:end], rest[end:].split("#", 1)[0]  # a fragment is never sent
    if "@" in authority:
        raise BadURL("must not contain user information (user:password@)")
    if "%" in authority:
        raise BadURL("the host must not be percent-encoded")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise BadURL("the IPv6 address has no closing ']'")
        try:
            ip6 = ipaddress.IPv6Address(authority[1:close])
        except ValueError:
            raise BadURL(f"{authority[1:close]!r} is not an IPv6 address") from None
        ip: IPAddress | None = ip6
        host, after = ip6.compressed, authority[close + 1 :]
        if after and not after.startswith(":"):
            raise BadURL("unexpected text after the IPv6 address")
        port_text = after[1:] if after else None
    else:
        if authority.count(":") > 1:
            raise BadURL("an IPv6 address must be written in brackets ([…])")
        name, colon, port_text = authority.partition(":")
        port_text = port_text if colon else None
        host, ip = _host(name)
    if port_text is None:
        port = 443 if scheme == "https" else 80
    elif port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 and 1 <= int(port_text) <= 65535:
        port = int(port_text)
    else:
        raise BadURL(f"the port must be a number from 1 to 65535, not {port_text!r}")
    path = quote(tail, safe=_PATH_SAFE)
    path = path if path.startswith("/") else "/" + path
    return ParsedURL(scheme, host, port, path, ip)


def _host(name: str) -> tuple[str, ipaddress.IPv4Address | None]:
    """A host that is not an IPv6 literal, canonical: IDNA-encoded, lower case, and either
    a dotted-quad IPv4 address or a DNS name."""
    if not name:
        raise BadURL("must be an http:// or https:// URL with a host (the host is empty)")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise BadURL(f"host {name!r} is not a valid internationalized domain name (IDNA)") from None
    name = name.lower()
    if name.endswith("."):
        raise BadURL(f"host {name!r} must not end with a dot")
    labels = name.split(".")
    if "" in labels:
        raise BadURL(f"host {name!r} has an empty label")
    if labels[-1].isdigit() or _HEX.fullmatch(labels[-1]):
        # It ends in a number, so resolvers and URL parsers read it as an IPv4 address,
        # in forms they disagree on; only the plain dotted quad is accepted.
        if len(labels) == 4 and all(_IPV4_PART.fullmatch(p) and int(p) <= 255 for p in labels):
            return name, ipaddress.IPv4Address(name)
        raise BadURL(
            f"host {name!r} is a numeric shorthand of an IPv4 address; write it as four decimal "
            f"numbers without leading zeros (a.b.c.d)"
        )
    if len(name) > 253:
        raise BadURL("the host name is longer than 253 characters")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise BadURL(f"host {name!r} has an invalid label {label[:70]!r}")
        if label.startswith("xn--"):
            try:
                label.encode("ascii").decode("idna")
            except UnicodeError:
                raise BadURL(f"host {name!r} is not a valid internationalized domain name (IDNA)") from None
    return name, None


def check_url(
    url: str, allow: tuple[str, ...], loc: list[str | int] | None = None, *, resolve: Resolve = socket.getaddrinfo
) -> Target:
    """Refuse (422) a URL that ``parse_url`` refuses or that reaches a non-public address;
    return it pinned to the addresses checked (``Target.ips``), which is where a delivery
    connects. ``resolve`` (``socket.getaddrinfo``'s signature) is asked once."""
    loc = loc or ["webhook", "url"]

    def bad(msg: str) -> InputError:
        return InputError(f"webhook url: {msg}", [{"loc": loc, "msg": msg}])

    try:
        parsed = parse_url(url)
    except BadURL as exc:
        raise bad(str(exc)) from None
    host = parsed.host
    if parsed.ip is not None:
        addresses = [parsed.ip]
    else:
        try:
            infos = resolve(host, parsed.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            addresses = [
                ipaddress.ip_address(info[4][0].split("%")[0])
                for info in infos
                if info[0] in (socket.AF_INET, socket.AF_INET6)
            ]
        except (OSError, UnicodeError, ValueError):
            addresses = []
        if not addresses:
            raise bad(f"host {host!r} does not resolve")
    if host not in allow:  # a host name the operator trusts is pinned, not checked
        networks = _networks(allow)
        for ip in addresses:
            why = _refusal(ip, networks)
            if why:
                where = f"resolves to {ip}," if parsed.ip is None else "is"
                raise bad(
                    f"host {host!r} {where} {why}; webhooks may only reach public addresses "
                    f"unless VRAMQ_WEBHOOK_ALLOW_HOSTS allows it"
                )
    ips = tuple(dict.fromkeys(str(ip) for ip in addresses))
    return Target(parsed.scheme, host, parsed.port, parsed.path, parsed.ip, ips=ips)


def _networks(allow: tuple[str, ...]) -> list[IPNetwork]:
    out: list[IPNetwork] = []
    for entry in allow:
        try:
            out.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue  # a host name entry
    return out


_NOT_PUBLIC = (ipaddress.IPv6Network("64:ff9b:1::/48"),)
"""Not globally reachable (RFC 8215, local-use NAT64) although older Pythons say so."""
_NAT64_LOCAL = _NOT_PUBLIC[0]
_NAT64_WKP = ipaddress.ip_network("64:ff9b::/96")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")
_COMPAT = ipaddress.ip_network("::/96")


def _refusal(ip: IPAddress, networks: list[IPNetwork]) -> str | None:
    """Why ``ip`` may not be reached (``None`` if it may): it and every IPv4 address it
    reaches through translation must each be public or inside an allowed network."""
    for v4 in _embedded_ipv4(ip, networks):
        if not (v4.is_global or any(v4 in n for n in networks)):
            return f"an address that reaches {v4}, a {_kind(v4)} address, through IPv6-to-IPv4 translation"
    if not ((ip.is_global and not any(ip in n for n in _NOT_PUBLIC)) or any(ip in n for n in networks)):
        return f"a {_kind(ip)} address"
    return None


def _embedded_ipv4(ip: IPAddress, networks: list[IPNetwork]) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address reaches through a translation mechanism: IPv4-mapped
    and -compatible, NAT64 (64:ff9b::/96, and 64:ff9b:1::/48 at the RFC 6052 position of
    the allowed prefix, or at every position), 6to4 and Teredo (server and client)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.teredo is not None:
        return list(ip.teredo)
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip in _NAT64_WKP or (ip in _COMPAT and int(ip) > 1):  # :: and ::1 are themselves
        return [low32]
    if ip in _NAT64_LOCAL:
        prefixes = [
            n.prefixlen
            for n in networks
            if ip in n and isinstance(n, ipaddress.IPv6Network) and n.subnet_of(_NAT64_LOCAL)
        ]
        lengths = [max(prefixes)] if prefixes and max(prefixes) in (48, 56, 64, 96) else [48, 56, 64, 96]
        packed = ip.packed
        without_u = packed[:8] + packed[9:]  # RFC 6052: bits 64-71 are not part of the address
        return [low32 if n == 96 else ipaddress.IPv4Address(without_u[n // 8 : n // 8 + 4]) for n in lengths]
    return []


def _kind(ip: IPAddress) -> str:
    for name in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    return "non-public"
