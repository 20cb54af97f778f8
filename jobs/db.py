"""Database engine, sessions and migrations (SQLite for the embedded default, PostgreSQL in production)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, CursorResult, Engine, Result
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .errors import ServiceUnavailable

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str, *, dead_peer_s: float = 15.0) -> Engine:
    """An engine tuned for the backend: WAL and a busy timeout on SQLite, pre-ping on PostgreSQL.

    ``dead_peer_s`` (PostgreSQL): how soon a session whose client went silent is ended on
    both sides. A worker cut off from the network in the middle of a transaction holds
    row locks (its jobs, an account's wallet); without this the server keeps them for the
    hours TCP takes to notice, and every other worker's lease reaper waits on them. The
    server ends a transaction left idle that long (``idle_in_transaction_session_timeout``)
    and a connection whose peer stops acknowledging (``tcp_user_timeout``, keepalives);
    the client does the same for its side. vramq's transactions are all short, so half a
    lease (``Services`` passes it) is far beyond any of them."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # pysqlite's own transaction handling defers BEGIN past SELECTs; take it over
            # so a transaction starts where SQLAlchemy says it does.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")  # writers queue instead of failing
            _until_unlocked(lambda: cur.execute("PRAGMA journal_mode=WAL"))  # readers never wait for the writer
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            # Deferred by default: a read-only transaction takes no lock, and every write
            # path starts with its write (conditional UPDATEs, INSERTs), so none upgrades
            # a read lock. ``sqlite_begin="IMMEDIATE"`` takes the write lock up front.
            conn.exec_driver_sql("BEGIN " + conn.get_execution_options().get("sqlite_begin", "DEFERRED"))

        return engine
    url = url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url
    url = url.replace("postgres://", "postgresql+psycopg://", 1) if url.startswith("postgres://") else url
    ms, whole_s = int(dead_peer_s * 1000), max(int(dead_peer_s // 3), 1)
    server = (
        f"-c idle_in_transaction_session_timeout={ms} -c tcp_user_timeout={ms} "
        f"-c tcp_keepalives_idle={whole_s} -c tcp_keepalives_interval={whole_s} -c tcp_keepalives_count=3"
    )
    client = {
        "keepalives": 1,
        "keepalives_idle": whole_s,
        "keepalives_interval": whole_s,
        "keepalives_count": 3,
        "tcp_user_timeout": ms,
    }
    return create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args={"options": server, **client}
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def writing(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction that reads before it writes. On SQLite it takes the write lock at
    BEGIN, so a concurrent writer makes it wait (busy timeout) instead of failing at its
    first write with "database is locked". Elsewhere it is ``sessions.begin()``."""
    with sessions.begin() as session:
        session.connection(execution_options={"sqlite_begin": "IMMEDIATE"})
        yield session


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE that ``Session.execute`` ran matched. Such a statement's
    result is a ``CursorResult``; ``Session.execute`` is annotated as returning ``Result``."""
    return cast("CursorResult[Any]", result).rowcount


def _until_unlocked(statement: Callable[[], object], seconds: float = 30.0) -> None:
    """Run ``statement``, again while SQLite answers "database is locked". Switching to
    WAL can be refused at once, without the busy handler, while another process holds
    the database (a fresh file that process is migrating, the last connection of another
    process checkpointing on close)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            statement()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (Alembic ``upgrade head``)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # Several processes may start at once (API replicas, workers); one migrates, the
    # others wait for it and then find nothing left to do.
    with engine.connect() as conn:
        conn = conn.execution_options(sqlite_begin="IMMEDIATE")  # SQLite: the write lock first
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7224107)")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")


def ping(engine: Engine) -> None:
    """Raise ServiceUnavailable when the database cannot answer ``SELECT 1``."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise ServiceUnavailable(f"database unreachable: {exc.__class__.__name__}") from exc
