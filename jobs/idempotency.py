"""``Idempotency-Key``: the same key and body within the window return the same resource;
the same key with another body is a conflict."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .errors import Conflict, InputError
from .lifecycle import utcnow
from .schema import IdempotencyKey

if TYPE_CHECKING:
    from .services import Services

MAX_KEY_CHARS = 255

T = TypeVar("T")
Remember = Callable[[Session, str], None]
"""``remember(session, resource_id)``: record the key in the transaction that commits the resource."""


def digest(body: Any) -> str:
    """A stable hash of a request body (JSON-able, or bytes)."""
    raw = body if isinstance(body, bytes) else json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()


def check_key(key: str) -> None:
    if len(key) > MAX_KEY_CHARS:
        raise InputError(
            "Idempotency-Key is too long",
            [{"loc": ["header", "Idempotency-Key"], "msg": f"at most {MAX_KEY_CHARS} characters"}],
        )


def window(services: Services) -> timedelta:
    """How long a key is remembered (``VRAMQ_IDEMPOTENCY_HOURS``); the sweeper deletes
    older keys (jobs.retention)."""
    return timedelta(hours=services.settings.idempotency_hours)


def replay(services: Services, caller: str, key: str, body_digest: str) -> str | None:
    """The id of the resource an earlier request with this key made, or None.

    Raises Conflict when the key was used with a different body within the window. A
    use older than the window is forgotten here, so a later ``remember`` can record
    the key again (the sweeper may not have deleted it yet).
    """
    cutoff = utcnow() - window(services)
    with services.sessions() as session:
        row = session.get(IdempotencyKey, (caller, key))
        if row is None:
            return None
        if row.created_at >= cutoff:
            if row.request_hash != body_digest:
                raise Conflict("Idempotency-Key was used with a different request body")
            return str(row.resource_id)
    _forget(services, caller, key, cutoff)
    return None


def _forget(services: Services, caller: str, key: str, cutoff: datetime) -> None:
    """Delete the key's use if it is older than ``cutoff`` (a fresh concurrent use stays)."""
    with services.sessions.begin() as session:
        session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.caller == caller, IdempotencyKey.key == key, IdempotencyKey.created_at < cutoff
            )
        )


def remember(session: Session, caller: str, key: str, body_digest: str, resource_id: str) -> None:
    """Record the key in ``session``'s transaction (a concurrent duplicate fails its commit).

    Callers ask ``replay`` first, which forgets a use older than the window, so the key
    is free unless a concurrent request just took it."""
    session.add(
        IdempotencyKey(caller=caller, key=key, request_hash=body_digest, resource_id=resource_id, created_at=utcnow())
    )


def once(
    services: Services,
    caller: str,
    key: str | None,
    body: Any,
    create: Callable[[Remember], T],
    earlier: Callable[[str], T],
) -> tuple[T, bool]:
    """A request with an ``Idempotency-Key``, made once: ``(create(remember), True)``, or
    ``(earlier(resource_id), False)`` when a request with this key and the same ``body``
    made the resource within the window, or made it concurrently and won the commit.

    ``caller`` is whose keys these are (``Caller.id``): keys of different callers never
    meet. A request that is not the caller's own may name a namespace of its own here
    instead (an admin's credits: ``credit:<account id>``).

    ``body`` is what the digest covers (JSON-able, or bytes). ``create`` makes the
    resource and calls ``remember(session, resource_id)`` in the transaction that commits
    it: a concurrent request with the same key then fails its commit (IntegrityError)
    and is answered with the winner's resource. Without a key ``create`` runs and
    ``remember`` records nothing. Raises InputError for a key too long, Conflict for a
    key used with another body (``replay``)."""
    if not key:
        return create(lambda session, resource_id: None), True
    check_key(key)
    body_digest = digest(body)
    resource_id = replay(services, caller, key, body_digest)
    if resource_id is not None:
        return earlier(resource_id), False

    def remember_key(session: Session, resource_id: str) -> None:
        remember(session, caller, key, body_digest, resource_id)

    try:
        return create(remember_key), True
    except IntegrityError:
        resource_id = replay(services, caller, key, body_digest)
        if resource_id is None:
            raise
        return earlier(resource_id), False


def row_of(services: Services, table: type[Any]) -> Callable[[str], Any]:
    """``earlier`` for ``once`` when the resource is a row of ``table``."""

    def load(resource_id: str) -> Any:
        with services.sessions() as session:
            return session.get(table, resource_id)

    return load
