"""Database tables (SQLAlchemy 2). Migrations in ``jobs/migrations`` create them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .priorities import Priority


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite stores them naive)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[Priority] = mapped_column(String(8), default="normal")
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The lease: which worker runs the job, until when. See jobs.lifecycle.
    lease_owner: Mapped[str | None] = mapped_column(String(160), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    tokens_reserved: Mapped[int] = mapped_column(Integer, default=0)
    tokens_charged: Mapped[int] = mapped_column(Integer, default=0)
    usage_detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    caller: Mapped[str | None] = mapped_column(String(80), nullable=True)
    """The owner: an account id (``acct_…``) or ``anon:<client address>``; see jobs.accounts."""
    # Pricing fixed at submit (jobs.pricing): settlement uses these, not today's catalog.
    work_units: Mapped[float] = mapped_column(Float, default=0.0)
    price_rate: Mapped[float] = mapped_column(Float, default=0.0)
    min_tokens: Mapped[int] = mapped_column(Integer, default=0)
    batch_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    custom_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The batch line's own name for the job (``custom_id``); None outside batches."""
    saved: Mapped[bool] = mapped_column(Boolean, default=False)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    outputs_expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    """Set by the retention sweeper when it deleted the outputs (the row stays)."""
    webhook: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """``{"url", "events"}``: where the job's end is announced (jobs.webhooks)."""

    __table_args__ = (
        Index("ix_jobs_model_status_created", "model", "status", "created_at"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_caller_created", "caller", "created_at"),
        Index("ix_jobs_expires", "expires_at"),
        # The fair pick (jobs.fairness): queued jobs of a model and priority, by caller and age.
        Index("ix_jobs_fair", "model", "priority", "status", "caller", "created_at", "id"),
        Index("ix_jobs_model_status_caller", "model", "status", "caller"),  # each account's jobs running
        Index("ix_jobs_batch", "batch_id", "status"),
    )


class Batch(Base):
    """Many jobs submitted as one (``POST /v1/batches``); see jobs.batches.

    ``status`` is stored only as ``queued`` (open), ``canceled`` or ``completed``; an open
    batch reads ``running`` once any of its jobs started. Counts come from the jobs."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    caller: Mapped[str] = mapped_column(String(80))
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[Priority] = mapped_column(String(8))
    total: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    webhook: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    input_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    base_url: Mapped[str | None] = mapped_column(String(300), nullable=True)
    """The API's address as the submitter called it: where the manifest's local-store
    links point (``VRAMQ_PUBLIC_URL`` wins when set)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    """When the results manifest was written (every job had ended)."""
    results_key: Mapped[str | None] = mapped_column(String(200), nullable=True)

    __table_args__ = (
        Index("ix_batches_caller_created", "caller", "created_at"),
        Index("ix_batches_open", "finished_at"),
    )


class Account(Base):
    """A keyed caller. The key itself is never stored: its SHA-256 is (see jobs.accounts)."""

    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(120), nullable=True)
    tier: Mapped[str] = mapped_column(String(16), default="free")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    webhook_secret: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """``whsec_…``: signs this account's webhooks (Standard Webhooks); made on first use."""


class Wallet(Base):
    """One row per caller (account or anonymous address): the row a change to the
    caller's tokens locks first, so concurrent changes queue, and the running totals of
    the ledger (``day``'s allowance used, purchased balance), kept in the transaction that
    writes each ledger row so a submit reads one row instead of summing the history.
    ``jobs.ledger.audit`` recomputes them from the ledger."""

    __tablename__ = "wallets"

    caller: Mapped[str] = mapped_column(String(80), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    day: Mapped[str] = mapped_column(String(10), default="")
    used: Mapped[int] = mapped_column(BigInteger, default=0)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)


class LedgerEntry(Base):
    """One movement of tokens. Balances are sums over these rows (see jobs.ledger).

    ``allowance_delta`` moves tokens of the day's allowance of ``day`` (negative = spent);
    ``balance_delta`` moves purchased tokens (positive = credited). A job has at most one
    ``reserve`` and one closing entry (``settle`` or ``refund``), enforced by the unique
    constraint, so a settlement can never be written twice.
    """

    __tablename__ = "ledger"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    caller: Mapped[str] = mapped_column(String(80))
    entry: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    day: Mapped[str] = mapped_column(String(10))
    allowance_delta: Mapped[int] = mapped_column(BigInteger, default=0)
    balance_delta: Mapped[int] = mapped_column(BigInteger, default=0)
    reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("job_id", "entry", name="uq_ledger_job_entry"),
        Index("ix_ledger_caller_day", "caller", "day"),
    )


class Share(Base):
    """A public, revocable read-only link to one job's result (``/s/<token>``)."""

    __tablename__ = "shares"

    token: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class IdempotencyKey(Base):
    """An ``Idempotency-Key`` seen on a create call, per caller, with the body's hash."""

    __tablename__ = "idempotency_keys"

    caller: Mapped[str] = mapped_column(String(80), primary_key=True)
    """The caller's id (``Caller.id``), or a namespace of its own: an admin's credits to an
    account use ``credit:<account id>``, apart from the account's own keys (api.accounts_api)."""
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class WebhookDelivery(Base):
    """One event to deliver to one URL: the outbox the deliverer works from. ``id`` is
    the ``webhook-id`` header, the same on every attempt, so receivers can deduplicate."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    caller: Mapped[str] = mapped_column(String(80))
    """Whose webhook it is: the job's or batch's caller (its account signs the delivery)."""
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    batch_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    event: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[str] = mapped_column(Text)
    """The body, as signed: JSON text, fixed when the event happened."""
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_at"),)


class WebhookAttempt(Base):
    """One try at a delivery: what the receiver answered, or why there was no answer."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(String(40), index=True)
    number: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(String(300), nullable=True)
    duration_ms: Mapped[float] = mapped_column(Float, default=0.0)
