"""Webhooks per Standard Webhooks: checked at submit, written to an outbox when a job
ends, delivered by a CPU process (``vramq webhooks``), retried with backoff.

* **Submit.** ``webhook = {"url", "events"?}`` needs an account (the signing secret is
  per account). The URL must be http(s) and every address its host resolves to must be
  public: private, loopback, link-local (incl. cloud metadata), shared, reserved and
  multicast targets are refused (422) unless ``VRAMQ_WEBHOOK_ALLOW_HOSTS`` lists the host
  or a network holding the address.
* **Outbox.** When a job ends, the transaction that records its end also inserts a
  ``webhook_deliveries`` row (if its ``events`` want that event): nothing a GPU worker
  does waits on a receiver, and a crash between the two cannot lose the event.
* **Delivery.** ``Deliverer`` claims due rows (one conditional UPDATE, so several
  deliverers share the work), POSTs each from a thread pool (a receiver that never
  answers holds one thread until the timeout, never the others), signs with the
  ``standardwebhooks`` library, does not follow redirects, and reads at most
  ``MAX_RESPONSE_BYTES`` of an answer. The address is checked again at send time.
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
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

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


def check_url(url: str, allow: tuple[str, ...], loc: list | None = None) -> None:
    """Refuse (422) a URL that is not http(s) or reaches a non-public address."""
    loc = loc or ["webhook", "url"]

    def bad(msg: str) -> InputError:
        return InputError(f"webhook url: {msg}", [{"loc": loc, "msg": msg}])

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad("must be an http:// or https:// URL with a host")
    host = parts.hostname.lower()
    if host in allow:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, ValueError):
        raise bad(f"host {host!r} does not resolve") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if not ip.is_global and not _allowed(ip, allow):
            raise bad(f"host {host!r} resolves to {ip}, a {_kind(ip)} address; webhooks may only reach public "
                      f"addresses unless VRAMQ_WEBHOOK_ALLOW_HOSTS allows it")


def _allowed(ip, allow: tuple[str, ...]) -> bool:
    for entry in allow:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a host name entry
    return False


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
                 timeout: tuple[float, float] = TIMEOUT_S):
        import requests

        self.services = services
        self.schedule = schedule
        self.timeout = timeout
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="webhook")
        self.slots = threading.Semaphore(threads)
        self.http = requests.Session()
        self.http.trust_env = False  # no proxies from the environment: the guard checks the real target

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
            check_url(d.url, services.settings.webhook_allow_hosts)  # again: DNS may have changed
            now = utcnow()
            headers = {"content-type": "application/json", "user-agent": "vramq-webhooks/1",
                       "webhook-id": d.id, "webhook-timestamp": str(int(now.timestamp())),
                       "webhook-signature": Webhook(secret).sign(d.id, now, d.payload)}
            with self.http.post(d.url, data=d.payload.encode(), headers=headers, timeout=self.timeout,
                                allow_redirects=False, stream=True) as resp:
                status_code = resp.status_code
                resp.raw.read(MAX_RESPONSE_BYTES, decode_content=False)  # a little of it, never all
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

