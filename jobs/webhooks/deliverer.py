"""The deliverer: claims due deliveries from the outbox and sends them from a thread pool,
retrying on ``RETRY_SCHEDULE_S``; every attempt is recorded."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select, update

from ..errors import InputError
from ..lifecycle import utcnow
from ..schema import Account, WebhookAttempt, WebhookDelivery
from .sender import TIMEOUT_S, default_ca_certs, post_pinned
from .signing import signed_headers
from .urls import Resolve, check_url

if TYPE_CHECKING:
    from ..services import Services

log = logging.getLogger("vramq.webhooks")

RETRY_SCHEDULE_S = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800, 28800)
CLAIM_S = 60.0
"""A claimed delivery is due again after this, should its deliverer die mid-attempt."""


class Deliverer:
    """Claims due deliveries and sends them from a thread pool."""

    def __init__(
        self,
        services: Services,
        threads: int = 16,
        schedule: tuple[float, ...] = RETRY_SCHEDULE_S,
        timeout: tuple[float, float] = TIMEOUT_S,
        *,
        resolve: Resolve = socket.getaddrinfo,
        ca_certs: str | None = None,
    ):
        self.services = services
        self.schedule = schedule
        self.timeout = timeout
        self.resolve = resolve
        """How the send-time check resolves a host (``socket.getaddrinfo``; a seam for tests)."""
        self.ca_certs = ca_certs or default_ca_certs()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="webhook")
        self.slots = threading.Semaphore(threads)

    def run(self, stop: threading.Event, idle_s: float = 0.5, also: Callable[[], object] | None = None) -> None:
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
            due = (
                select(WebhookDelivery.id)
                .where(WebhookDelivery.status == "pending", WebhookDelivery.next_at <= now)
                .order_by(WebhookDelivery.next_at)
                .limit(limit)
                .scalar_subquery()
            )
            return [
                r[0]
                for r in session.execute(
                    update(WebhookDelivery)
                    .where(
                        WebhookDelivery.id.in_(due), WebhookDelivery.status == "pending", WebhookDelivery.next_at <= now
                    )
                    .values(next_at=now + timedelta(seconds=CLAIM_S))
                    .returning(WebhookDelivery.id)
                )
            ]

    def _send_and_release(self, delivery_id: str) -> None:
        try:
            self.send(delivery_id)
        except Exception:
            log.exception("webhook %s: attempt failed unexpectedly", delivery_id)
        finally:
            self.slots.release()

    def send(self, delivery_id: str) -> None:
        services = self.services
        with services.sessions() as session:
            d = session.get(WebhookDelivery, delivery_id)
            assert d is not None, delivery_id  # claimed just now; deliveries are never deleted
            secret = session.execute(select(Account.webhook_secret).where(Account.id == d.caller)).scalar_one()
        status_code, error = None, None
        t0 = time.perf_counter()
        try:
            # Again (DNS may have changed), and the request goes to the address this check pinned.
            target = check_url(d.url, services.settings.webhook_allow_hosts, resolve=self.resolve)
            assert secret is not None  # made with the delivery (outbox.write calls signing.secret_for)
            headers = signed_headers(secret, d.id, d.payload, utcnow())
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
            session.add(
                WebhookAttempt(
                    delivery_id=d.id,
                    number=number,
                    at=now,
                    status_code=status_code,
                    error=error if not ok else None,
                    duration_ms=duration_ms,
                )
            )
            session.execute(update(WebhookDelivery).where(WebhookDelivery.id == d.id).values(attempts=number, **values))
        log.info(
            "webhook %s to %s: attempt %d %s",
            d.id,
            d.url,
            number,
            "delivered" if ok else f"failed ({status_code or error}); {values.get('status', 'retrying')}",
        )
