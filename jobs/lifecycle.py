"""The job state machine, as atomic conditional updates.

    queued ──take──▶ running ──succeed──▶ succeeded
      │  ▲             │ ├────fail─────▶ failed  (also: lease lapsed MAX_ATTEMPTS times)
      │  └──requeue────┘ │   (lease lapsed: its worker died, or it gave the job back)
      └──cancel──▶ canceled ◀──cancel──┘

Every transition is one ``UPDATE … WHERE status = <expected>`` whose row count says
whether this caller won. Nothing reads a row and writes it back, so two workers, a
redelivered message and a cancel can race freely: exactly one wins each transition.

The lease makes "never twice, never lost" hold together: a worker owns a running job
until ``lease_expires_at``, renews it while it works, and may record the outcome only
while it still owns it. A job whose lease lapsed is queued again by whoever notices
first (``requeue_expired``), or failed once it has killed ``VRAMQ_MAX_ATTEMPTS`` workers.
``jobs.outcomes.end`` wraps these transitions with the ledger, the webhook outbox and
the events; nothing else ends a job.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, cast

from sqlalchemy import BindParameter, ColumnElement, Table, Update, and_, bindparam, inspect, or_, select, update
from sqlalchemy.orm import Session

from .db import rowcount
from .errors import Conflict, NotFound
from .priorities import Priority
from .schema import Job

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = "queued", "running", "succeeded", "failed", "canceled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED})


def utcnow() -> datetime:
    return datetime.now(UTC)


# The two transitions every job makes, built once: building an UPDATE costs more Python
# than executing a cached one. Each reads the row back (``RETURNING``), so the worker
# needs no SELECT after it.
_jobs = cast("Table", Job.__table__)
_c = _jobs.c


def _param(name: str, column: str) -> BindParameter[Any]:
    return bindparam(name, type_=_c[column].type)


_TAKE = (
    update(_jobs)
    .where(
        _c.id == bindparam("t_id"),
        or_(_c.status == QUEUED, and_(_c.status == RUNNING, _c.lease_expires_at < _param("t_now", "started_at"))),
    )
    .values(
        status=RUNNING,
        lease_owner=bindparam("t_worker"),
        lease_expires_at=_param("t_until", "lease_expires_at"),
        started_at=_param("t_now", "started_at"),
        progress=0.0,
        attempts=_c.attempts + 1,
    )
    .returning(*_c)
)
_SUCCEED = (
    update(_jobs)
    .where(_c.id == bindparam("s_id"), _c.status == RUNNING, _c.lease_owner == bindparam("s_worker"))
    .values(
        status=SUCCEEDED,
        output=_param("s_output", "output"),
        progress=1.0,
        finished_at=_param("s_now", "finished_at"),
        gpu_seconds=bindparam("s_gpu_seconds"),
        usage_detail=_param("s_usage", "usage_detail"),
        lease_owner=None,
        lease_expires_at=None,
        expires_at=_param("s_expires", "expires_at"),
    )
    .returning(*_c)
)
_ATTRIBUTE = {column.key: attribute.key for attribute in inspect(Job).column_attrs for column in attribute.columns}
"""Column key -> ``Job`` attribute (``metadata`` -> ``meta``)."""


def _won(session: Session, transition: Update, params: dict[str, Any]) -> Job | None:
    """Run a one-job conditional UPDATE; the row as it left it, or None when it matched
    nothing (another caller won the race). The row is a ``Job`` outside the session, to
    read (its attributes are all loaded)."""
    row = session.execute(transition, params).mappings().first()
    if row is None:
        return None
    return Job(**{_ATTRIBUTE[key]: value for key, value in row.items()})


def take(session: Session, job_id: str, worker: str, lease_s: float, now: datetime | None = None) -> Job | None:
    """Claim a queued job (or one whose lease lapsed) for ``worker``. The job as the claim
    left it if this call won, else None."""
    now = now or utcnow()
    return _won(
        session,
        _TAKE,
        {"t_id": job_id, "t_now": now, "t_worker": worker, "t_until": now + timedelta(seconds=lease_s)},
    )


def renew(
    session: Session, worker: str, job_ids: Iterable[str], lease_s: float, now: datetime | None = None
) -> set[str]:
    """Extend ``worker``'s leases on these jobs; return the ids it still owns and runs."""
    ids = list(job_ids)
    if not ids:
        return set()
    now = now or utcnow()
    session.execute(
        update(Job)
        .where(Job.id.in_(ids), Job.status == RUNNING, Job.lease_owner == worker)
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
    )
    rows = session.execute(select(Job.id).where(Job.id.in_(ids), Job.status == RUNNING, Job.lease_owner == worker))
    return {r[0] for r in rows}


def record_progress(session: Session, worker: str, progress: dict[str, float]) -> None:
    """Write progress for jobs ``worker`` still runs (one statement per job, in id order,
    the order the multi-row statements lock in, so two transactions never wait on each other)."""
    for job_id, fraction in sorted(progress.items()):
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == RUNNING, Job.lease_owner == worker)
            .values(progress=min(max(fraction, 0.0), 1.0))
        )


def succeed(
    session: Session,
    job_id: str,
    worker: str,
    output: dict[str, Any],
    gpu_seconds: float,
    usage_detail: dict[str, Any],
    expires_at: datetime | None,
    now: datetime | None = None,
) -> Job | None:
    """Record success, if ``worker`` still owns the job: the job as it now is. None means
    the result must be dropped."""
    now = now or utcnow()
    return _won(
        session,
        _SUCCEED,
        {
            "s_id": job_id,
            "s_worker": worker,
            "s_output": output,
            "s_now": now,
            "s_gpu_seconds": gpu_seconds,
            "s_usage": usage_detail,
            "s_expires": expires_at,
        },
    )


def fail(
    session: Session,
    job_id: str,
    worker: str | None,
    code: str,
    message: str,
    gpu_seconds: float = 0.0,
    now: datetime | None = None,
) -> bool:
    """Record failure. With ``worker`` None, fail a job that is still queued (never ran)."""
    now = now or utcnow()
    cond = [Job.id == job_id]
    cond += [Job.status == QUEUED] if worker is None else [Job.status == RUNNING, Job.lease_owner == worker]
    result = session.execute(
        update(Job)
        .where(*cond)
        .values(
            status=FAILED,
            error_code=code,
            error_message=message[:2000],
            finished_at=now,
            gpu_seconds=gpu_seconds,
            lease_owner=None,
            lease_expires_at=None,
        )
    )
    return rowcount(result) == 1


def release(session: Session, job_id: str, worker: str) -> bool:
    """Give a running job back to the queue (a worker stopping before it could finish it).

    The attempt is not counted: the job did not kill its worker, so it must not move
    towards the attempt cap (``jobs.outcomes``)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == RUNNING, Job.lease_owner == worker)
        .values(
            status=QUEUED,
            lease_owner=None,
            lease_expires_at=None,
            progress=0.0,
            started_at=None,
            attempts=Job.attempts - 1,
        )
    )
    return rowcount(result) == 1


def cancel(session: Session, job_id: str, now: datetime | None = None) -> str:
    """Cancel a queued or running job (the transition alone; ``jobs.outcomes.end`` adds the
    ledger, webhook and events); return the status it had (``queued`` or ``running``).

    Raises NotFound when the job does not exist and Conflict when it has already finished.
    """
    moved = cancel_where(session, Job.id == job_id, now)
    for status in (QUEUED, RUNNING):
        if moved[status]:
            return status
    raise_not_cancelable(session, job_id)


def raise_not_cancelable(session: Session, job_id: str) -> NoReturn:
    """NotFound for a job that does not exist, Conflict for one already finished."""
    status = session.execute(select(Job.status).where(Job.id == job_id)).scalar()
    if status is None:
        raise NotFound(f"no job {job_id}")
    raise Conflict(f"job {job_id} already {status}")


def cancel_where(session: Session, condition: ColumnElement[bool], now: datetime | None = None) -> dict[str, list[str]]:
    """Cancel every queued or running job matching ``condition`` (one UPDATE per state);
    return the ids canceled by the state they had: ``{"queued": […], "running": […]}``."""
    now = now or utcnow()
    return {
        status: [
            row[0]
            for row in session.execute(
                update(Job)
                .where(condition, Job.status == status)
                .values(status=CANCELED, finished_at=now, lease_owner=None, lease_expires_at=None)
                .returning(Job.id)
            )
        ]
        for status in (QUEUED, RUNNING)
    }


def canceled_among(session: Session, job_ids: Iterable[str]) -> set[str]:
    ids = list(job_ids)
    if not ids:
        return set()
    rows = session.execute(select(Job.id).where(Job.id.in_(ids), Job.status == CANCELED))
    return {r[0] for r in rows}


def requeue_expired(
    session: Session, job_ids: list[str], now: datetime | None = None
) -> list[tuple[str, str, Priority]]:
    """Queue again those of ``job_ids`` still running with a lapsed lease; return
    ``(id, model, priority)`` of each moved (the caller publishes a turn for each).

    One statement that both checks and moves the rows: concurrent reapers each move a
    disjoint set, and on SQLite it never upgrades a read lock to a write lock."""
    if not job_ids:
        return []
    now = now or utcnow()
    rows = session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == RUNNING, Job.lease_expires_at < now)
        .values(status=QUEUED, lease_owner=None, lease_expires_at=None, progress=0.0)
        .returning(Job.id, Job.model, Job.priority)
    )
    return [(job_id, model, priority) for job_id, model, priority in rows]


def fail_lapsed(session: Session, job_id: str, code: str, message: str, now: datetime | None = None) -> bool:
    """Fail a running job whose lease lapsed (no worker owns it any more)."""
    now = now or utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == RUNNING, Job.lease_expires_at < now)
        .values(
            status=FAILED,
            error_code=code,
            error_message=message[:2000],
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
        )
    )
    return rowcount(result) == 1
