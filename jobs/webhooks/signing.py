"""Signing: each account's Standard Webhooks secret, and the headers a signed delivery carries."""

from __future__ import annotations

import base64
import secrets
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..schema import Account

USER_AGENT = "vramq-webhooks/1"


def secret_for(session: Session, account_id: str) -> str:
    """The account's signing secret (``whsec_`` + base64 of 24 random bytes), made on
    first use; call it in a write transaction."""
    fresh = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    session.execute(
        update(Account).where(Account.id == account_id, Account.webhook_secret.is_(None)).values(webhook_secret=fresh)
    )
    secret = session.execute(select(Account.webhook_secret).where(Account.id == account_id)).scalar_one()
    assert secret is not None  # set by the update above when it was not yet
    return secret


def signed_headers(secret: str, delivery_id: str, payload: str, now: datetime) -> dict[str, str]:
    """The headers of one attempt: ``webhook-id`` (the same on every retry),
    ``webhook-timestamp`` and ``webhook-signature`` over both and the body."""
    from standardwebhooks import Webhook

    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": delivery_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(delivery_id, now, payload),
    }
