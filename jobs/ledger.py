"""The token ledger: every reservation, settlement, refund and credit is a row.

A caller's *used today* is minus the sum of its ``allowance_delta`` for today, its
*balance* (purchased tokens) the sum of its ``balance_delta``. The caller's ``wallets``
row keeps both as running totals, updated in the same transaction as each ledger row,
so a submit reads one row instead of summing the caller's history; ``audit`` recomputes
them from the ledger and the tests hold the two equal.

Every change first locks the wallet row (``UPDATE … RETURNING``: a row lock on
PostgreSQL, the database write lock on SQLite), then decides, then writes its ledger row
and the new totals, all in the transaction it is called in: concurrent submits for one
caller queue on that lock and can never spend the same token twice.

Rules (also in docs/tokens.md):

* **The day.** Allowances are per UTC calendar day and reset at 00:00 UTC for everyone
  (``resets_at``). A fixed boundary is easy to state and to check; a rolling 24 h window
  would need per-spend expiry.
* **Spending order.** A reservation takes today's allowance first, then the purchased
  balance. Unused allowance does not carry over; the balance never expires.
* **Settlement below the reservation** gives back the difference, to the balance first
  (up to what the reservation took from it), then to the allowance of the day the
  reservation was made.
* **Settlement above the reservation** (the job ran longer than estimated) charges the
  excess from what the caller has left now (today's allowance, then balance). A caller
  never goes below zero: what is not covered is written off, and the settle row's
  ``reason`` says how much. The estimate is calibrated from recent runs so this is rare.
* **Refunds.** A job that fails, or is canceled before it starts, gets its whole
  reservation back. A job canceled while running is charged ``min_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Insert, Row, Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from .errors import InputError, QuotaExceeded
from .pricing import charge
from .schema import Account, Base, Job, LedgerEntry, Wallet
from .views import iso

if TYPE_CHECKING:
    from .settings import Settings

MAX_CREDIT = 1_000_000_000


def _iso(when: datetime) -> str:
    """``views.iso`` for a time that is there (its annotation allows None in and out)."""
    text = iso(when)
    assert text is not None
    return text


def day_of(now: datetime) -> str:
    return now.astimezone(UTC).date().isoformat()


def resets_at(now: datetime) -> datetime:
    """The next 00:00 UTC: when today's allowance is whole again."""
    today = now.astimezone(UTC).date()
    return datetime.combine(today + timedelta(days=1), time(0), tzinfo=UTC)


class Allowances:
    """Daily allowance by tier (``VRAMQ_ANONYMOUS_DAILY_TOKENS``, ``VRAMQ_FREE_DAILY_TOKENS``)."""

    def __init__(self, settings: Settings):
        self.by_tier: dict[str, int] = {
            "anonymous": settings.anonymous_daily_tokens,
            "free": settings.free_daily_tokens,
        }

    def for_tier(self, tier: str) -> int:
        return self.by_tier.get(tier, self.by_tier["free"])

    def for_caller(self, session: Session, caller: str) -> int:
        if caller.startswith("anon:"):
            return self.by_tier["anonymous"]
        tier = session.execute(select(Account.tier).where(Account.id == caller)).scalar()
        return self.for_tier(tier or "free")


@dataclass
class _Totals:
    """The caller's wallet row as locked: allowance used on ``day``, and the balance."""

    caller: str
    day: str
    used: int
    balance: int

    def used_on(self, session: Session, day: str) -> int:
        if day == self.day:
            return self.used
        if day > self.day:
            return 0  # no entry yet on a later day
        return ledger_used(session, self.caller, day)  # an earlier day (clocks around midnight)


# The wallet statements, built once: a submit and a settlement each run two of them, and
# building a statement costs more Python than executing a cached one.
_wallets = cast("Table", Wallet.__table__)
_BUMP = (
    update(_wallets)
    .where(_wallets.c.caller == bindparam("w_caller"))
    .values(version=_wallets.c.version + 1)
    .returning(_wallets.c.day, _wallets.c.used, _wallets.c.balance)
)
_SET_TOTALS = (
    update(_wallets)
    .where(_wallets.c.caller == bindparam("w_caller"))
    .values(day=bindparam("w_day"), used=bindparam("w_used"), balance=bindparam("w_balance"))
)
_INSERT_ENTRY = insert(cast("Table", LedgerEntry.__table__))


def lock(session: Session, caller: str) -> _Totals:
    """Take the caller's wallet lock for the rest of the transaction (creating the row
    once) and return its totals."""
    row = session.execute(_BUMP, {"w_caller": caller}).first()
    if row is None:
        session.execute(
            _insert_ignore(session, Wallet, {"caller": caller, "version": 0, "day": "", "used": 0, "balance": 0})
        )
        row = session.execute(_BUMP, {"w_caller": caller}).first()
        assert row is not None  # inserted just now, or by a concurrent transaction
    return _Totals(caller, row.day, int(row.used), int(row.balance))


def _insert_ignore(session: Session, table: type[Base], values: dict[str, Any]) -> Insert:
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table).values(**values).on_conflict_do_nothing()
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table).values(**values).on_conflict_do_nothing()


def ledger_used(session: Session, caller: str, day: str) -> int:
    return -int(
        session.execute(
            select(func.coalesce(func.sum(LedgerEntry.allowance_delta), 0)).where(
                LedgerEntry.caller == caller, LedgerEntry.day == day
            )
        ).scalar_one()
    )


def audit(session: Session, caller: str, day: str) -> tuple[int, int]:
    """``(used on day, balance)`` recomputed from the ledger rows alone."""
    balance = session.execute(
        select(func.coalesce(func.sum(LedgerEntry.balance_delta), 0)).where(LedgerEntry.caller == caller)
    ).scalar_one()
    return ledger_used(session, caller, day), int(balance)


@dataclass(frozen=True)
class Usage:
    tier: str
    daily_allowance: int
    used_today: int
    balance: int
    resets_at: datetime

    @property
    def available(self) -> int:
        return max(0, self.daily_allowance - self.used_today) + self.balance

    def to_json(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "daily_allowance": self.daily_allowance,
            "used_today": self.used_today,
            "balance": self.balance,
            "available": self.available,
            "resets_at": iso(self.resets_at),
        }


def usage(session: Session, caller: str, tier: str, allowances: Allowances, now: datetime) -> Usage:
    row = session.get(Wallet, caller)
    totals = _Totals(caller, row.day, row.used, row.balance) if row else _Totals(caller, "", 0, 0)
    return Usage(
        tier=tier,
        daily_allowance=allowances.for_tier(tier),
        used_today=totals.used_on(session, day_of(now)),
        balance=totals.balance,
        resets_at=resets_at(now),
    )


def _entry(
    session: Session,
    totals: _Totals,
    entry: str,
    now: datetime,
    *,
    day: str | None = None,
    job_id: str | None = None,
    allowance: int = 0,
    balance: int = 0,
    reason: str | None = None,
) -> LedgerEntry:
    """Write one ledger row and move the locked wallet's totals by the same amounts."""
    row = LedgerEntry(
        caller=totals.caller,
        entry=entry,
        job_id=job_id,
        day=day or day_of(now),
        allowance_delta=allowance,
        balance_delta=balance,
        reason=reason,
        created_at=now,
    )
    session.add(row)
    _move(session, totals, row.day, allowance, balance)
    session.flush()
    return row


def _move(session: Session, totals: _Totals, day: str, allowance: int, balance: int) -> None:
    """Move the locked wallet's running totals by ledger amounts written on ``day``."""
    totals.balance += balance
    if day == totals.day:
        totals.used -= allowance
    elif day > totals.day:  # the first entry of a new day: yesterday's use is history
        totals.day, totals.used = day, -allowance
    session.execute(
        _SET_TOTALS,
        {"w_caller": totals.caller, "w_day": totals.day, "w_used": totals.used, "w_balance": totals.balance},
    )


def reserve(session: Session, caller: str, daily: int, job_id: str, tokens: int, now: datetime) -> None:
    """Hold ``tokens`` for a job, or raise 402 ``quota_exceeded`` (nothing is written then)."""
    reserve_many(session, caller, daily, [(job_id, tokens)], now)


def reserve_many(session: Session, caller: str, daily: int, items: list[tuple[str, int]], now: datetime) -> None:
    """Hold tokens for many jobs (``(job_id, tokens)``) under one lock: all or none (402).

    Each job gets its own ``reserve`` row, taken from today's allowance first and then
    the balance, in the order given, so each can be settled or refunded on its own."""
    totals = lock(session, caller)
    day = day_of(now)
    used, balance = totals.used_on(session, day), totals.balance
    allowance_left = max(0, daily - used)
    available = allowance_left + balance
    tokens = sum(t for _, t in items)
    if tokens > available:
        what = "this job needs" if len(items) == 1 else f"these {len(items)} jobs need"
        raise QuotaExceeded(
            f"{what} {tokens} tokens and {available} are left (daily allowance {daily}, "
            f"{used} used today, balance {balance}); the allowance resets at {iso(resets_at(now))}",
            needed=tokens,
            available=available,
            resets_at=_iso(resets_at(now)),
        )
    rows: list[dict[str, Any]] = []
    spent_allowance = 0
    for job_id, t in items:
        a = min(t, allowance_left - spent_allowance)
        spent_allowance += a
        rows.append(
            {
                "caller": caller,
                "entry": "reserve",
                "job_id": job_id,
                "day": day,
                "allowance_delta": -a,
                "balance_delta": -(t - a),
                "reason": None,
                "created_at": now,
            }
        )
    session.execute(_INSERT_ENTRY, rows if len(rows) > 1 else rows[0])
    _move(session, totals, day, -spent_allowance, -(tokens - spent_allowance))


_JOB_ENTRIES = select(
    LedgerEntry.entry, LedgerEntry.caller, LedgerEntry.day, LedgerEntry.allowance_delta, LedgerEntry.balance_delta
).where(LedgerEntry.job_id == bindparam("job_id"))
_SET_CHARGED = (
    update(cast("Table", Job.__table__))
    .where(Job.__table__.c.id == bindparam("job_id"))
    .values(tokens_charged=bindparam("charged"))
)


@dataclass(frozen=True)
class Settlement:
    reserved: int
    cost: int
    charged: int
    written_off: int


def settle(
    session: Session, job: Job, gpu_seconds: float, allowances: Allowances, now: datetime, *, cost: int | None = None
) -> Settlement | None:
    """Close a finished job's reservation at its actual cost (see the module's rules).

    Call it in the transaction that recorded the job's end. Returns None when there is
    nothing to settle (no reservation, or already closed).
    """
    # The job's reserve row and any closing one, read before the wallet lock: the caller
    # has just moved the job out of ``running`` (a conditional UPDATE), so its row is
    # this transaction's until the commit and nobody else can close it meanwhile; the
    # unique (job, entry) constraint stands behind that.
    rows = {r.entry: r for r in session.execute(_JOB_ENTRIES, {"job_id": job.id})}
    res = rows.get("reserve")
    if res is None or "settle" in rows or "refund" in rows:
        return None
    totals = lock(session, res.caller)
    took_allowance, took_balance = -res.allowance_delta, -res.balance_delta
    reserved = took_allowance + took_balance
    if cost is None:
        cost = charge(gpu_seconds, job.price_rate, job.min_tokens)
    if cost <= reserved:
        back = reserved - cost
        to_balance = min(back, took_balance)
        _write(session, totals, "settle", res.day, job.id, allowance=back - to_balance, balance=to_balance, now=now)
        result = Settlement(reserved, cost, cost, 0)
    else:
        extra = cost - reserved
        day = day_of(now)
        used, balance = totals.used_on(session, day), totals.balance
        from_allowance = min(extra, max(0, allowances.for_caller(session, res.caller) - used))
        from_balance = min(extra - from_allowance, balance)
        written_off = extra - from_allowance - from_balance
        reason = f"cost {cost} over reservation {reserved}" + (f"; {written_off} written off" if written_off else "")
        _write(
            session,
            totals,
            "settle",
            day,
            job.id,
            allowance=-from_allowance,
            balance=-from_balance,
            reason=reason,
            now=now,
        )
        result = Settlement(reserved, cost, reserved + from_allowance + from_balance, written_off)
    session.execute(_SET_CHARGED, {"job_id": job.id, "charged": result.charged})
    set_committed_value(job, "tokens_charged", result.charged)  # the row as this transaction left it
    return result


def _write(
    session: Session,
    totals: _Totals,
    entry: str,
    day: str,
    job_id: str,
    *,
    allowance: int,
    balance: int,
    now: datetime,
    reason: str | None = None,
) -> None:
    """``_entry`` through the Core (no ORM object, no flush): a job's settlement."""
    session.execute(
        _INSERT_ENTRY,
        {
            "caller": totals.caller,
            "entry": entry,
            "job_id": job_id,
            "day": day,
            "allowance_delta": allowance,
            "balance_delta": balance,
            "reason": reason,
            "created_at": now,
        },
    )
    _move(session, totals, day, allowance, balance)


def refund(session: Session, job_id: str, now: datetime, reason: str) -> int:
    """Give a job's whole reservation back; return the tokens returned (0 if none or closed)."""
    return refund_many(session, [job_id], now, reason)


def refund_many(session: Session, job_ids: list[str], now: datetime, reason: str, chunk: int = 2000) -> int:
    """``refund`` for many jobs (a canceled batch): bulk rows, one lock per caller.

    Jobs without a reservation, or already closed, are skipped. Returns the tokens returned."""
    returned = 0
    for start in range(0, len(job_ids), chunk):
        ids = job_ids[start : start + chunk]
        open_rows = session.execute(
            select(
                LedgerEntry.caller,
                LedgerEntry.job_id,
                LedgerEntry.day,
                LedgerEntry.allowance_delta,
                LedgerEntry.balance_delta,
            )
            .where(LedgerEntry.job_id.in_(ids), LedgerEntry.entry == "reserve")
            .order_by(LedgerEntry.caller)
        ).all()
        by_caller: dict[str, list[Row[str, str | None, str, int, int]]] = {}
        for r in open_rows:
            by_caller.setdefault(r.caller, []).append(r)
        for caller, reservations in by_caller.items():
            totals = lock(session, caller)  # then look for closings: they cannot appear meanwhile
            closed = set(
                session.execute(
                    select(LedgerEntry.job_id).where(
                        LedgerEntry.job_id.in_([r.job_id for r in reservations]),
                        LedgerEntry.entry.in_(("settle", "refund")),
                    )
                ).scalars()
            )
            rows: list[dict[str, Any]] = []
            per_day: dict[str, tuple[int, int]] = {}
            for r in reservations:
                if r.job_id in closed:
                    continue
                rows.append(
                    {
                        "caller": caller,
                        "entry": "refund",
                        "job_id": r.job_id,
                        "day": r.day,
                        "allowance_delta": -r.allowance_delta,
                        "balance_delta": -r.balance_delta,
                        "reason": reason[:200],
                        "created_at": now,
                    }
                )
                a, b = per_day.get(r.day, (0, 0))
                per_day[r.day] = (a - r.allowance_delta, b - r.balance_delta)
            if not rows:
                continue
            session.execute(insert(LedgerEntry), rows)
            for day in sorted(per_day):
                _move(session, totals, day, *per_day[day])
            session.execute(update(Job).where(Job.id.in_([r["job_id"] for r in rows])).values(tokens_charged=0))
            returned += sum(r["allowance_delta"] + r["balance_delta"] for r in rows)
    return returned


def credit(session: Session, caller: str, tokens: int, reason: str | None, now: datetime) -> LedgerEntry:
    """Add purchased tokens (a pack) to the caller's balance."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_CREDIT:
        raise InputError(
            f"tokens must be an integer from 1 to {MAX_CREDIT}",
            [{"loc": ["tokens"], "msg": f"must be an integer from 1 to {MAX_CREDIT}"}],
        )
    if reason is not None and (not isinstance(reason, str) or len(reason) > 200):
        raise InputError(
            "reason must be a string of at most 200 characters",
            [{"loc": ["reason"], "msg": "must be a string of at most 200 characters"}],
        )
    return _entry(session, lock(session, caller), "credit", now, balance=tokens, reason=reason)


def entries(session: Session, caller: str, limit: int = 50) -> list[LedgerEntry]:
    return list(
        session.execute(
            select(LedgerEntry).where(LedgerEntry.caller == caller).order_by(LedgerEntry.id.desc()).limit(limit)
        ).scalars()
    )
