"""Accounts and API keys, and the caller a request is.

A key is ``vq_`` + 43 URL-safe characters (256 random bits). It is shown once, when the
account is made; the database keeps only its SHA-256 (a fast hash is right here: the
key is random, not a password, so there is nothing to brute-force) and the first 11
characters, for people to tell their keys apart.

Every caller pays with its own tokens and owns its jobs; its id (``Caller.id``) is what
the tables store as ``caller``: an account is its id (``acct_…``), a caller without a key
is ``anon:<client address>``.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from .errors import InputError, NotFound
from .ids import new_id
from .lifecycle import utcnow
from .schema import Account

KEY_PREFIX = "vq_"
TIERS = ("free",)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """Who is making a request: an account, an anonymous address, or the admin."""

    id: str
    """``acct_…`` or ``anon:<address>``: owner of jobs and payer of their tokens."""
    tier: str
    """``anonymous``, ``free``, … (the daily allowance follows it)."""
    account_id: str | None = None
    admin: bool = False

    @classmethod
    def anonymous(cls, address: str) -> Caller:
        return cls(id=f"anon:{address}", tier="anonymous")

    @property
    def keyed(self) -> bool:
        return self.account_id is not None

    def owns(self, owner: str | None) -> bool:
        """May this caller see a resource owned by ``owner``? (The admin sees all.)"""
        return self.admin or (owner is not None and owner == self.id)


def create_account(session: Session, name: str | None = None, tier: str = "free") -> tuple[Account, str]:
    """Make an account; return it with its API key (the only time the key exists in clear)."""
    if tier not in TIERS:
        raise InputError(
            f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}", [{"loc": ["tier"], "msg": "unknown tier"}]
        )
    if name is not None and len(name) > 120:
        raise InputError("name: at most 120 characters", [{"loc": ["name"], "msg": "at most 120 characters"}])
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    account = Account(
        id=new_id("acct"), name=name, tier=tier, key_hash=hash_key(key), key_prefix=key[:11], created_at=utcnow()
    )
    session.add(account)
    session.flush()
    return account, key


def by_key(session: Session, key: str) -> Account | None:
    if not key.startswith(KEY_PREFIX):
        return None
    return session.execute(select(Account).where(Account.key_hash == hash_key(key))).scalar_one_or_none()


def get_account(session: Session, account_id: str) -> Account:
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"no account {account_id}")
    return account


def caller_for(account: Account) -> Caller:
    return Caller(id=account.id, tier=account.tier, account_id=account.id)
