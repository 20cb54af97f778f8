"""Migrations on a database that already holds data, on SQLite and PostgreSQL.

0006 renames the paying party's columns to ``caller`` (``wallets.holder``,
``ledger.holder``, ``webhook_deliveries.holder``, ``idempotency_keys.scope``) and the
ledger's index with them: the rows written under the old names must be there, intact,
under the new ones, and the downgrade must give them back under the old names."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from vramq.jobs import ledger
from vramq.jobs.db import MIGRATIONS, make_engine, make_sessionmaker
from vramq.jobs.schema import IdempotencyKey, LedgerEntry, UTCDateTime, Wallet, WebhookDelivery

ACCOUNT = "acct_0123456789abcdef"
ANON = "anon:203.0.113.5"
NOW = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
DAY = "2026-11-20"


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    engine = make_engine(url)
    yield engine
    engine.dispose()


def alembic(engine: sa.Engine, verb: str, revision: str) -> None:
    """``alembic upgrade|downgrade revision`` on ``engine``, as ``jobs.db.migrate`` runs it."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, verb)(cfg, revision)


def old_tables() -> dict[str, sa.TableClause]:
    """The four tables as 0005 left them: the paying party's column is ``holder``
    (``scope`` for idempotency keys)."""
    return {
        "wallets": sa.table(
            "wallets",
            sa.column("holder"),
            sa.column("version"),
            sa.column("day"),
            sa.column("used"),
            sa.column("balance"),
        ),
        "ledger": sa.table(
            "ledger",
            sa.column("id"),
            sa.column("holder"),
            sa.column("entry"),
            sa.column("job_id"),
            sa.column("day"),
            sa.column("allowance_delta"),
            sa.column("balance_delta"),
            sa.column("reason"),
            sa.column("created_at", UTCDateTime),
        ),
        "idempotency_keys": sa.table(
            "idempotency_keys",
            sa.column("scope"),
            sa.column("key"),
            sa.column("request_hash"),
            sa.column("resource_id"),
            sa.column("created_at", UTCDateTime),
        ),
        "webhook_deliveries": sa.table(
            "webhook_deliveries",
            sa.column("id"),
            sa.column("holder"),
            sa.column("job_id"),
            sa.column("batch_id"),
            sa.column("event"),
            sa.column("url"),
            sa.column("payload"),
            sa.column("status"),
            sa.column("attempts"),
            sa.column("next_at", UTCDateTime),
            sa.column("created_at", UTCDateTime),
        ),
    }


def write_old_rows(engine: sa.Engine) -> None:
    """A wallet, its credit in the ledger, the credit's idempotency key (under its own
    ``credit:`` namespace), a job's idempotency key and a webhook delivery: as 0005 stores them."""
    t = old_tables()
    with engine.begin() as conn:
        conn.execute(
            sa.insert(t["wallets"]), [{"holder": ACCOUNT, "version": 3, "day": DAY, "used": 0, "balance": 5000}]
        )
        entry_id = conn.execute(
            sa.insert(t["ledger"])
            .values(
                holder=ACCOUNT,
                entry="credit",
                job_id=None,
                day=DAY,
                allowance_delta=0,
                balance_delta=5000,
                reason="a pack",
                created_at=NOW,
            )
            .returning(t["ledger"].c.id)
        ).scalar_one()
        conn.execute(
            sa.insert(t["idempotency_keys"]),
            [
                {
                    "scope": f"credit:{ACCOUNT}",
                    "key": "pack-1",
                    "request_hash": "h1",
                    "resource_id": str(entry_id),
                    "created_at": NOW,
                },
                {"scope": ANON, "key": "pack-1", "request_hash": "h2", "resource_id": "job_1", "created_at": NOW},
            ],
        )
        conn.execute(
            sa.insert(t["webhook_deliveries"]),
            [
                {
                    "id": "msg_1",
                    "holder": ACCOUNT,
                    "job_id": "job_1",
                    "batch_id": None,
                    "event": "job.succeeded",
                    "url": "https://example.com/hook",
                    "payload": "{}",
                    "status": "pending",
                    "attempts": 0,
                    "next_at": NOW,
                    "created_at": NOW,
                }
            ],
        )


def columns(engine: sa.Engine, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns(table)}


def ledger_indexes(engine: sa.Engine) -> dict[str | None, list[str | None]]:
    return {ix["name"]: ix["column_names"] for ix in sa.inspect(engine).get_indexes("ledger")}


def test_0006_renames_the_paying_partys_columns_and_keeps_the_rows(engine):
    alembic(engine, "upgrade", "0005")
    write_old_rows(engine)

    alembic(engine, "upgrade", "head")

    for table in ("wallets", "ledger", "webhook_deliveries", "idempotency_keys"):
        assert "caller" in columns(engine, table), table
        assert not {"holder", "scope"} & columns(engine, table), table
    assert ledger_indexes(engine).get("ix_ledger_caller_day") == ["caller", "day"]
    assert "ix_ledger_holder_day" not in ledger_indexes(engine)
    assert sa.inspect(engine).get_pk_constraint("wallets")["constrained_columns"] == ["caller"]
    assert sa.inspect(engine).get_pk_constraint("idempotency_keys")["constrained_columns"] == ["caller", "key"]

    sessions = make_sessionmaker(engine)
    with sessions() as s:
        wallet = s.get(Wallet, ACCOUNT)
        assert wallet is not None
        assert (wallet.caller, wallet.version, wallet.day, wallet.used, wallet.balance) == (ACCOUNT, 3, DAY, 0, 5000)
        entry = s.execute(sa.select(LedgerEntry).where(LedgerEntry.caller == ACCOUNT)).scalar_one()
        assert (
            entry.entry,
            entry.job_id,
            entry.day,
            entry.allowance_delta,
            entry.balance_delta,
            entry.reason,
            entry.created_at,
        ) == ("credit", None, DAY, 0, 5000, "a pack", NOW)
        assert ledger.audit(s, ACCOUNT, DAY) == (0, 5000)
        credit_key = s.get(IdempotencyKey, (f"credit:{ACCOUNT}", "pack-1"))
        assert credit_key is not None
        assert (credit_key.request_hash, credit_key.resource_id, credit_key.created_at) == ("h1", str(entry.id), NOW)
        job_key = s.get(IdempotencyKey, (ANON, "pack-1"))
        assert job_key is not None and (job_key.request_hash, job_key.resource_id) == ("h2", "job_1")
        delivery = s.get(WebhookDelivery, "msg_1")
        assert delivery is not None
        assert (delivery.caller, delivery.job_id, delivery.event, delivery.next_at) == (
            ACCOUNT,
            "job_1",
            "job.succeeded",
            NOW,
        )

    # The new names work for writes too: the ledger locks the wallet by its caller.
    with sessions.begin() as s:
        ledger.credit(s, ACCOUNT, 100, "another pack", NOW)
    with sessions() as s:
        assert ledger.audit(s, ACCOUNT, DAY) == (0, 5100)
        assert s.get(Wallet, ACCOUNT).balance == 5100

    # Down again: the rows are back under the old names.
    alembic(engine, "downgrade", "0005")
    for table in ("wallets", "ledger", "webhook_deliveries"):
        assert "holder" in columns(engine, table) and "caller" not in columns(engine, table), table
    assert "scope" in columns(engine, "idempotency_keys") and "caller" not in columns(engine, "idempotency_keys")
    assert ledger_indexes(engine).get("ix_ledger_holder_day") == ["holder", "day"]
    assert "ix_ledger_caller_day" not in ledger_indexes(engine)
    t = old_tables()
    with engine.connect() as conn:
        assert conn.execute(sa.select(t["wallets"].c.holder, t["wallets"].c.balance)).all() == [(ACCOUNT, 5100)]
        assert sorted(conn.execute(sa.select(t["ledger"].c.holder, t["ledger"].c.balance_delta)).all()) == [
            (ACCOUNT, 100),
            (ACCOUNT, 5000),
        ]
        assert sorted(conn.execute(sa.select(t["idempotency_keys"].c.scope, t["idempotency_keys"].c.key)).all()) == [
            (ANON, "pack-1"),
            (f"credit:{ACCOUNT}", "pack-1"),
        ]
        assert conn.execute(sa.select(t["webhook_deliveries"].c.holder)).all() == [(ACCOUNT,)]

    # And up once more (a downgraded database upgrades again).
    alembic(engine, "upgrade", "head")
    with sessions() as s:
        assert ledger.audit(s, ACCOUNT, DAY) == (0, 5100)
