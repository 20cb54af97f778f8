"""Webhooks per Standard Webhooks: checked at submit, written to an outbox when a job
ends, delivered by a CPU process (``vramq webhooks``), retried with backoff.

* **Submit.** ``webhook = {"url", "events"?}`` needs an account (the signing secret is
  per account). The URL is read by one strict parser (``parse_url``) that refuses what two
  URL parsers could read differently (backslashes, ``user:pass@``, control characters,
  whitespace, percent-encoded or empty hosts, ports outside 1-65535, invalid IDNA,
  trailing dots, numeric shorthands such as ``127.1``). It must be http(s) and every
  address its host resolves to must be public: private, loopback, link-local (incl. cloud
  metadata), shared, reserved and multicast targets are refused (422) unless
  ``VRAMQ_WEBHOOK_ALLOW_HOSTS`` lists the host or a network holding the address. An IPv6
  address that reaches IPv4 space by translation (IPv4-mapped/-compatible, NAT64, 6to4,
  Teredo) is judged by its IPv4 address too.
* **Outbox.** When a job ends, the transaction that records its end also inserts a
  ``webhook_deliveries`` row (if its ``events`` want that event): nothing a GPU worker
  does waits on a receiver, and a crash between the two cannot lose the event.
* **Delivery.** ``Deliverer`` claims due rows (one conditional UPDATE, so several
  deliverers share the work), POSTs each from a thread pool (a receiver that never
  answers holds one thread until the timeout, never the others), signs with the
  ``standardwebhooks`` library, does not follow redirects, and reads at most
  ``MAX_RESPONSE_BYTES`` of an answer. The URL is checked again at send time, and the
  request connects to the address that check resolved and judged (``post_pinned``), with
  the URL's ``Host`` and, for https, its SNI and certificate name: a later DNS answer
  (rebinding) or another parser cannot move it.
* **Retries.** A non-2xx answer, a timeout or a refused connection is retried with the
  same ``webhook-id`` after ``RETRY_SCHEDULE_S`` (5 s, 30 s, 2 min, 10 min, 30 min, 1 h,
  2 h, 4 h, then 8 h three times: 31.7 h in all), then the delivery is ``failed``.
  Every attempt is a ``webhook_attempts`` row (``GET /v1/jobs/{id}/deliveries``).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import secrets
import re
import socket
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .errors import InputError, validation_errors
from .ids import new_id
from .lifecycle import utcnow
from .schema import Account, Job, WebhookAttempt, WebhookDelivery
from .views import iso

log = logging.getLogger("vramq.webhooks")

JOB_EVENTS = ("job.succeeded", "job.failed", "job.canceled")
BATCH_EVENTS = ("batch.completed",)
RETRY_SCHEDULE_S = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800, 28800)
TIMEOUT_S = (5.0, 10.0)
"""Connect and read timeouts of one attempt."""
MAX_RESPONSE_BYTES = 4096
CLAIM_S = 60.0
"""A claimed delivery is due again after this, should its deliverer die mid-attempt."""


class WebhookSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)
    events: list[Literal["job.succeeded", "job.failed", "job.canceled", "batch.completed"]] | None = Field(
        default=None, min_length=1)


def secret_for(session: Session, account_id: str) -> str:
    """The account's signing secret (``whsec_`` + base64 of 24 random bytes), made on
    first use; call it in a write transaction."""
    fresh = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    session.execute(update(Account).where(Account.id == account_id, Account.webhook_secret.is_(None))
                    .values(webhook_secret=fresh))
    return session.execute(select(Account.webhook_secret).where(Account.id == account_id)).scalar_one()


# --- the URL guard -------------------------------------------------------------------


class _BadURL(ValueError):
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
    """Read a webhook URL strictly, refusing (``_BadURL``) whatever two URL parsers could
    read differently: backslashes, user information, control characters, whitespace,
    percent-encoded or empty hosts, ports outside 1-65535, invalid IDNA, trailing dots,
    and numeric host shorthands (``2130706433``, ``0x7f.1``, ``127.1``)."""
    if not isinstance(url, str):
        raise _BadURL("must be a string")
    for ch in url:
        if ch == "\\":
            raise _BadURL("must not contain a backslash")
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
            raise _BadURL(f"must not contain whitespace or control characters (found U+{ord(ch):04X})")
    m = _SCHEME.match(url)
    if not m:
        raise _BadURL("must be an http:// or https:// URL with a host")
    scheme, rest = m.group(1).lower(), url[m.end():]
    end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0] or [len(rest)])
    authority, tail = rest[:end], rest[end:].split("#", 1)[0]  # a fragment is never sent
    if "@" in authority:
        raise _BadURL("must not contain user information (user:password@)")
    if "%" in authority:
        raise _BadURL("the host must not be percent-encoded")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise _BadURL("the IPv6 address has no closing ']'")
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.IPv6Address(authority[1:close])
        except ValueError:
            raise _BadURL(f"{authority[1:close]!r} is not an IPv6 address") from None
        host, after = ip.compressed, authority[close + 1:]
        if after and not after.startswith(":"):
            raise _BadURL("unexpected text after the IPv6 address")
        port_text = after[1:] if after else None
    else:
        if authority.count(":") > 1:
            raise _BadURL("an IPv6 address must be written in brackets ([…])")
        name, colon, port_text = authority.partition(":")
        port_text = port_text if colon else None
        host, ip = _host(name)
    if port_text is None:
        port = 443 if scheme == "https" else 80
    elif port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 and 1 <= int(port_text) <= 65535:
        port = int(port_text)
    else:
        raise _BadURL(f"the port must be a number from 1 to 65535, not {port_text!r}")
    path = quote(tail, safe=_PATH_SAFE)
    path = path if path.startswith("/") else "/" + path
    return ParsedURL(scheme, host, port, path, ip)


def _host(name: str) -> tuple[str, ipaddress.IPv4Address | None]:
    """A host that is not an IPv6 literal, canonical: IDNA-encoded, lower case, and either
    a dotted-quad IPv4 address or a DNS name."""
    if not name:
        raise _BadURL("must be an http:// or https:// URL with a host (the host is empty)")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise _BadURL(f"host {name!r} is not a valid internationalized domain name (IDNA)") from None
    name = name.lower()
    if name.endswith("."):
        raise _BadURL(f"host {name!r} must not end with a dot")
    labels = name.split(".")
    if "" in labels:
        raise _BadURL(f"host {name!r} has an empty label")
    if labels[-1].isdigit() or _HEX.fullmatch(labels[-1]):
        # It ends in a number, so resolvers and URL parsers read it as an IPv4 address,
        # in forms they disagree on; only the plain dotted quad is accepted.
        if len(labels) == 4 and all(_IPV4_PART.fullmatch(p) and int(p) <= 255 for p in labels):
            return name, ipaddress.IPv4Address(name)
        raise _BadURL(f"host {name!r} is a numeric shorthand of an IPv4 address; write it as four decimal "
                      f"numbers without leading zeros (a.b.c.d)")
    if len(name) > 253:
        raise _BadURL("the host name is longer than 253 characters")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise _BadURL(f"host {name!r} has an invalid label {label[:70]!r}")
        if label.startswith("xn--"):
            try:
                label.encode("ascii").decode("idna")
            except UnicodeError:
                raise _BadURL(f"host {name!r} is not a valid internationalized domain name (IDNA)") from None
    return name, None


def check_url(url: str, allow: tuple[str, ...], loc: list | None = None, *,
              resolve=socket.getaddrinfo) -> Target:
    """Refuse (422) a URL that ``parse_url`` refuses or that reaches a non-public address;
    return it pinned to the addresses checked (``Target.ips``), which is where a delivery
    connects. ``resolve`` (``socket.getaddrinfo``'s signature) is asked once."""
    loc = loc or ["webhook", "url"]

    def bad(msg: str) -> InputError:
        return InputError(f"webhook url: {msg}", [{"loc": loc, "msg": msg}])

    try:
        parsed = parse_url(url)
    except _BadURL as exc:
        raise bad(str(exc)) from None
    host = parsed.host
    if parsed.ip is not None:
        addresses = [parsed.ip]
    else:
        try:
            infos = resolve(host, parsed.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos
                         if info[0] in (socket.AF_INET, socket.AF_INET6)]
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
                raise bad(f"host {host!r} {where} {why}; webhooks may only reach public addresses "
                          f"unless VRAMQ_WEBHOOK_ALLOW_HOSTS allows it")
    ips = tuple(dict.fromkeys(str(ip) for ip in addresses))
    return Target(parsed.scheme, host, parsed.port, parsed.path, parsed.ip, ips=ips)


def _networks(allow: tuple[str, ...]) -> list:
    out = []
    for entry in allow:
        try:
            out.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue  # a host name entry
    return out


_NOT_PUBLIC = (ipaddress.ip_network("64:ff9b:1::/48"),)
"""Not globally reachable (RFC 8215, local-use NAT64) although older Pythons say so."""
_NAT64_LOCAL = _NOT_PUBLIC[0]
_NAT64_WKP = ipaddress.ip_network("64:ff9b::/96")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")
_COMPAT = ipaddress.ip_network("::/96")


def _refusal(ip, networks: list) -> str | None:
    """Why ``ip`` may not be reached (``None`` if it may): it and every IPv4 address it
    reaches through translation must each be public or inside an allowed network."""
    for v4 in _embedded_ipv4(ip, networks):
        if not (v4.is_global or any(v4 in n for n in networks)):
            return f"an address that reaches {v4}, a {_kind(v4)} address, through IPv6-to-IPv4 translation"
    if not ((ip.is_global and not any(ip in n for n in _NOT_PUBLIC)) or any(ip in n for n in networks)):
        return f"a {_kind(ip)} address"
    return None


def _embedded_ipv4(ip, networks: list) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address reaches through a translation mechanism: IPv4-mapped
    and -compatible, NAT64 (64:ff9b::/96, and 64:ff9b:1::/48 at the RFC 6052 position of
    the allowed prefix, or at every position), 6to4 and Teredo (server and client)."""
    if ip.version != 6:
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
        prefixes = [n.prefixlen for n in networks if ip in n and n.version == 6 and n.subnet_of(_NAT64_LOCAL)]
        lengths = [max(prefixes)] if prefixes and max(prefixes) in (48, 56, 64, 96) else [48, 56, 64, 96]
        packed = ip.packed
        without_u = packed[:8] + packed[9:]  # RFC 6052: bits 64-71 are not part of the address
        return [low32 if n == 96 else ipaddress.IPv4Address(without_u[n // 8:n // 8 + 4]) for n in lengths]
    return []


def _kind(ip) -> str:
    for name in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    return "non-public"


def parse_spec(raw: Any, allow: tuple[str, ...], *, batch: bool = False) -> dict:
    """A job's (or, with ``batch``, a batch's) ``webhook``, checked: ``{"url", "events"}``.

    A job's events default to all three job events. A batch's default to
    ``batch.completed``; job events named on a batch are sent for each of its jobs."""
    from pydantic import ValidationError

    try:
        spec = WebhookSpec.model_validate(raw)
    except ValidationError as exc:
        raise InputError("webhook is invalid", validation_errors(exc, ["webhook"])) from None
    allowed = JOB_EVENTS + BATCH_EVENTS if batch else JOB_EVENTS
    for i, event in enumerate(spec.events or ()):
        if event not in allowed:
            msg = f"{event!r} is not an event of a {'batch' if batch else 'job'}; one of {', '.join(allowed)}"
            raise InputError(f"webhook is invalid: {msg}", [{"loc": ["webhook", "events", str(i)], "msg": msg}])
    check_url(spec.url, allow)
    events = spec.events or (BATCH_EVENTS if batch else JOB_EVENTS)
    return {"url": spec.url, "events": sorted(set(events))}


# --- the outbox ----------------------------------------------------------------------


def enqueue(session: Session, job_id: str, event: str, render, now: datetime | None = None) -> str | None:
    """Write the delivery of ``event`` for a job that asked for it, in the caller's
    transaction. ``render(job)`` gives the job's JSON. Returns the delivery id."""
    job = session.get(Job, job_id, populate_existing=True)  # as this transaction left it
    if job is None or not job.webhook or event not in job.webhook.get("events", JOB_EVENTS):
        return None
    return _outbox(session, job.caller or "", job.webhook["url"], event, render(job), now, job_id=job.id)


def enqueue_batch(session: Session, batch, event: str, data: dict, now: datetime | None = None) -> str | None:
    """Write the delivery of a batch ``event`` (``data``: the batch's JSON), if it asked."""
    if not batch.webhook or event not in batch.webhook.get("events", BATCH_EVENTS):
        return None
    return _outbox(session, batch.caller, batch.webhook["url"], event, data, now, batch_id=batch.id)


def _outbox(session: Session, holder: str, url: str, event: str, data: dict, now: datetime | None,
            *, job_id: str | None = None, batch_id: str | None = None) -> str:
    """Write one delivery row: the signed body is fixed now. Returns its id."""
    now = now or utcnow()
    secret_for(session, holder)  # exists before the first attempt signs with it
    delivery_id = new_id("msg")
    payload = json.dumps({"type": event, "timestamp": iso(now), "data": data}, separators=(",", ":"))
    session.add(WebhookDelivery(id=delivery_id, holder=holder, job_id=job_id, batch_id=batch_id, event=event,
                                url=url, payload=payload, status="pending", attempts=0, next_at=now, created_at=now))
    return delivery_id


def deliveries(session: Session, job_id: str | None = None, batch_id: str | None = None) -> list[dict]:
    """A job's (or a batch's own) deliveries, each with its attempts."""
    which = WebhookDelivery.job_id == job_id if job_id else WebhookDelivery.batch_id == batch_id
    rows = session.execute(select(WebhookDelivery).where(which)
                           .order_by(WebhookDelivery.created_at)).scalars().all()
    out = []
    for d in rows:
        attempts = session.execute(select(WebhookAttempt).where(WebhookAttempt.delivery_id == d.id)
                                   .order_by(WebhookAttempt.number)).scalars().all()
        out.append({"id": d.id, "event": d.event, "url": d.url, "status": d.status, "attempts": [
            {"number": a.number, "at": iso(a.at), "status_code": a.status_code,
             "error": a.error, "duration_ms": round(a.duration_ms, 1)} for a in attempts],
            "next_attempt_at": iso(d.next_at) if d.status == "pending" else None})
    return out


def renderer(services):
    """``render`` for ``enqueue`` outside a request: links point at ``VRAMQ_PUBLIC_URL``
    (relative without it, for the local store; S3 links are absolute anyway)."""
    from .views import Links, job_json

    links = Links(services.store, services.settings.link_ttl, services.settings.public_url or "")
    return lambda job: job_json(job, links)


# --- the deliverer -------------------------------------------------------------------


class Deliverer:
    """Claims due deliveries and sends them from a thread pool."""

    def __init__(self, services, threads: int = 16, schedule: tuple[float, ...] = RETRY_SCHEDULE_S,
                 timeout: tuple[float, float] = TIMEOUT_S, *, resolve=socket.getaddrinfo,
                 ca_certs: str | None = None):
        self.services = services
        self.schedule = schedule
        self.timeout = timeout
        self.resolve = resolve
        """How the send-time check resolves a host (``socket.getaddrinfo``; a seam for tests)."""
        self.ca_certs = ca_certs or _default_ca_certs()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="webhook")
        self.slots = threading.Semaphore(threads)

    def run(self, stop: threading.Event, idle_s: float = 0.5, also=None) -> None:
        """Deliver until ``stop``; ``also()`` runs every round too (the batch finisher)."""
        while not stop.is_set():
            if also is not None:
                try:
                    also()
                except Exception:  # database or store down: the next round tries again
                    log.exception("%s failed; retrying", getattr(also, "__qualname__", "the dispatcher's other task"))
            try:
                sent = self.tick()
            except Exception:  # database down: the next round tries again
                log.exception("webhook deliverer: claiming due deliveries failed; retrying")
                sent = 0
            if not sent:
                stop.wait(idle_s)

    def tick(self) -> int:
        """Claim what is due (as many as there are free threads) and start sending it."""
        free = 0
        while self.slots.acquire(blocking=False):
            free += 1
        if not free:
            return 0
        ids = self.claim(free)
        for _ in range(free - len(ids)):
            self.slots.release()
        for delivery_id in ids:
            self.pool.submit(self._send_and_release, delivery_id)
        return len(ids)

    def claim(self, limit: int) -> list[str]:
        now = utcnow()
        with self.services.sessions.begin() as session:
            due = (select(WebhookDelivery.id).where(WebhookDelivery.status == "pending", WebhookDelivery.next_at <= now)
                   .order_by(WebhookDelivery.next_at).limit(limit).scalar_subquery())
            return [r[0] for r in session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(due), WebhookDelivery.status == "pending", WebhookDelivery.next_at <= now)
                .values(next_at=now + timedelta(seconds=CLAIM_S)).returning(WebhookDelivery.id))]

    def _send_and_release(self, delivery_id: str) -> None:
        try:
            self.send(delivery_id)
        except Exception:
            log.exception("webhook %s: attempt failed unexpectedly", delivery_id)
        finally:
            self.slots.release()

    def send(self, delivery_id: str) -> None:
        from standardwebhooks import Webhook

        services = self.services
        with services.sessions() as session:
            d = session.get(WebhookDelivery, delivery_id)
            secret = session.execute(select(Account.webhook_secret).where(Account.id == d.holder)).scalar_one()
        status_code, error = None, None
        t0 = time.perf_counter()
        try:
            # Again (DNS may have changed), and the request goes to the address this check pinned.
            target = check_url(d.url, services.settings.webhook_allow_hosts, resolve=self.resolve)
            now = utcnow()
            headers = {"content-type": "application/json", "user-agent": "vramq-webhooks/1",
                       "webhook-id": d.id, "webhook-timestamp": str(int(now.timestamp())),
                       "webhook-signature": Webhook(secret).sign(d.id, now, d.payload)}
            status_code = post_pinned(target, d.payload.encode(), headers, self.timeout, self.ca_certs)
        except InputError as exc:
            error = str(exc)[:300]
        except Exception as exc:  # timeouts, refused connections, TLS errors
            error = f"{exc.__class__.__name__}: {exc}"[:300]
        self.record(d, status_code, error, (time.perf_counter() - t0) * 1000)

    def record(self, d: WebhookDelivery, status_code: int | None, error: str | None, duration_ms: float) -> None:
        now = utcnow()
        ok = status_code is not None and 200 <= status_code < 300
        number = d.attempts + 1
        if ok:
            values = {"status": "delivered", "finished_at": now}
        elif number > len(self.schedule):
            values = {"status": "failed", "finished_at": now}
        else:
            values = {"next_at": now + timedelta(seconds=self.schedule[number - 1])}
        with self.services.sessions.begin() as session:
            session.add(WebhookAttempt(delivery_id=d.id, number=number, at=now, status_code=status_code,
                                       error=error if not ok else None, duration_ms=duration_ms))
            session.execute(update(WebhookDelivery).where(WebhookDelivery.id == d.id)
                            .values(attempts=number, **values))
        log.info("webhook %s to %s: attempt %d %s", d.id, d.url, number,
                 "delivered" if ok else f"failed ({status_code or error}); {values.get('status', 'retrying')}")



def _default_ca_certs() -> str | None:
    """The CA bundle requests would use (certifi's), else the system's (``None``)."""
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


def post_pinned(target: Target, body: bytes, headers: dict[str, str], timeout: tuple[float, float] = TIMEOUT_S,
                ca_certs: str | None = None) -> int:
    """POST ``body`` to a checked ``target`` and return the status code. The connection
    goes to one of ``target.ips`` (the next only if connecting to one fails at once),
    never to a fresh DNS answer; the request carries ``Host: target.host_header`` and, for
    https, SNI and certificate verification for ``target.host``. Redirects are not
    followed and at most ``MAX_RESPONSE_BYTES`` of the answer is read."""
    from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, Timeout
    from urllib3.exceptions import NewConnectionError

    if not target.ips:
        raise ValueError("the target has no checked address")
    headers = {**headers, "Host": target.host_header}
    for n, ip in enumerate(target.ips):
        kw: dict[str, Any] = {"port": target.port, "timeout": Timeout(connect=timeout[0], read=timeout[1]),
                              "maxsize": 1, "retries": False}
        if target.scheme == "https":
            pool = HTTPSConnectionPool(ip, cert_reqs="CERT_REQUIRED", ca_certs=ca_certs, server_hostname=target.host,
                                       assert_hostname=target.host, **kw)
        else:
            pool = HTTPConnectionPool(ip, **kw)
        try:
            resp = pool.urlopen("POST", target.path, body=body, headers=headers, redirect=False, retries=False,
                                preload_content=False, assert_same_host=False)
            try:
                resp.read(MAX_RESPONSE_BYTES, decode_content=False)  # a little of it, never all
            finally:
                resp.close()
            return resp.status
        except NewConnectionError:  # refused or unreachable at once (not a timeout): the next checked address
            if n == len(target.ips) - 1:
                raise
        finally:
            pool.close()
    raise AssertionError("unreachable")
