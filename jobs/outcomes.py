"""Where a job's run ends, in one place: the transition, the ledger, the outbox, the events.

Every way a run can end goes through ``end``, inside the caller's transaction:

=====================  ======================  ==========================================
outcome                from                    ledger / webhook
=====================  ======================  ==========================================
``Succeeded``          running, lease owned     settled at its cost / ``job.succeeded``
``Failed``             running, lease owned     refunded in full / ``job.failed``
                       (or queued: never ran)
``Canceled``           queued                   refunded in full / ``job.canceled``
                       running                  charged ``min_tokens`` / ``job.canceled``
``LeaseLapsed``        running, lease lapsed    none: queued again (a new turn is
                                                published), or, past the attempt cap,
                                                failed ``worker_lost`` and refunded
``GivenBack``          running, lease owned     none: queued again, the attempt not
                                                counted (the worker stopped before it)
=====================  ======================  ==========================================

Each transition is one conditional UPDATE (``jobs.lifecycle``), so whoever loses a race
(a late worker whose lease lapsed, a cancel after the end) changes nothing and is told
so. ``end`` returns an ``Ending``: which jobs moved, the turns to publish and the events
to append; the caller publishes and announces them **after** its commit, so no worker
can take a turn before the job it announces is visible, and no stream says what the
database does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from . import ledger, lifecycle
from .events import Event, EventWriter, emit
from .lifecycle import CANCELED, FAILED, QUEUED, RUNNING, SUCCEEDED
from .priorities import Priority
from .schema import Job
from .webhooks import outbox

if TYPE_CHECKING:
    from celery import Celery
    from redis import Redis

log = logging.getLogger("vramq.outcomes")

#: The error code of a job whose worker died with it ``VRAMQ_MAX_ATTEMPTS`` times.
WORKER_LOST = "worker_lost"


@dataclass(frozen=True)
class Succeeded:
    output: dict[str, Any]
    gpu_seconds: float
    usage: dict[str, Any]
    expires_at: datetime | None


@dataclass(frozen=True)
class Failed:
    code: str
    message: str
    gpu_seconds: float = 0.0


@dataclass(frozen=True)
class Canceled:
    """Canceled by its owner, or with its batch."""


@dataclass(frozen=True)
class LeaseLapsed:
    """Its worker stopped renewing the lease (died, hung, or was cut off)."""

    max_attempts: int
    limit: int = 100


@dataclass(frozen=True)
class GivenBack:
    """Its worker is stopping and hands the job back before finishing it."""


Outcome = Succeeded | Failed | Canceled | LeaseLapsed | GivenBack


@dataclass
class Ending:
    """What one ``end`` did, and what is left to do after the commit."""

    moved: dict[str, list[str]] = field(default_factory=dict)
    """Job ids by the status they now have (``succeeded``, ``queued``, …)."""
    canceled_running: list[str] = field(default_factory=list)
    """Of the canceled jobs, those that were running (their workers stop between steps)."""
    turns: list[tuple[str, str, Priority]] = field(default_factory=list)
    """``(job id, model, priority)`` of each job queued again: one message each."""
    events: list[Event] = field(default_factory=list)

    @property
    def won(self) -> bool:
        return any(self.moved.values())

    def ids(self, status: str) -> list[str]:
        return self.moved.get(status, [])

    def publish(self, celery: Celery) -> None:
        """Send a turn for each job queued again (after the commit; raises if the broker is
        down: the jobs stay queued, and ``jobs.turns`` tops up what is missing)."""
        from .queue import publish

        for job_id, model, priority in self.turns:
            publish(celery, job_id, model, priority)

    def announce(self, sink: EventWriter | Redis) -> None:
        """Append the events: ``sink`` is an ``EventWriter`` (``put``) or a Redis client.
        Best effort: the job row is the record, the stream only a live view of it."""
        for job_id, event, data in self.events:
            try:
                if isinstance(sink, EventWriter):
                    sink.put(job_id, event, data)
                else:
                    emit(sink, job_id, event, data)
            except Exception as exc:  # Redis down: readers fall back on the row
                log.warning("event %s of %s not appended: %s", event, job_id, exc)
                return


JobJson = Callable[[Job], dict[str, Any]]
"""``job_json(job)``: the job's JSON (``jobs.views.job_json`` with the links to use)."""


def end(
    session: Session,
    outcome: Outcome,
    *,
    job_id: str | None = None,
    where: ColumnElement[bool] | None = None,
    worker: str | None = None,
    allowances: ledger.Allowances | None = None,
    job_json: JobJson | None = None,
    now: datetime | None = None,
) -> Ending:
    """End the run of one job (``job_id``), or of every job matching ``where`` (cancel
    and lease expiry), with ``outcome``; in the caller's transaction.

    ``worker``: the lease owner recording the outcome (None: a job that never ran).
    ``allowances``: needed to settle a success or a running cancel (``ledger.settle``).
    ``job_json(job)``: the job's JSON for webhook payloads (None: no webhooks written).
    """
    now = now or lifecycle.utcnow()
    ending = Ending()
    if isinstance(outcome, Succeeded):
        job_id, worker, allowances = _one(job_id), _owner(worker), _settling(allowances)
        job = lifecycle.succeed(
            session, job_id, worker, outcome.output, outcome.gpu_seconds, outcome.usage, outcome.expires_at, now
        )
        if job is not None:
            ledger.settle(session, job, outcome.gpu_seconds, allowances, now)
            _ended(session, ending, [job_id], SUCCEEDED, "job.succeeded", job_json, now, job)
            ending.events.insert(0, (job_id, "progress", {"progress": 1.0}))
    elif isinstance(outcome, Failed):
        job_id = _one(job_id)
        if lifecycle.fail(session, job_id, worker, outcome.code, outcome.message, outcome.gpu_seconds, now):
            ledger.refund(session, job_id, now, f"refund: job failed ({outcome.code})")
            _ended(session, ending, [job_id], FAILED, "job.failed", job_json, now)
    elif isinstance(outcome, Canceled):
        condition = Job.id == job_id if job_id is not None else where
        if condition is None:
            raise TypeError("a cancel names its jobs: pass job_id or where")
        moved = lifecycle.cancel_where(session, condition, now)
        ledger.refund_many(session, moved[QUEUED], now, "refund: canceled before it started")
        for jid in moved[RUNNING]:  # it held a GPU slot: charged its minimum
            job = _reloaded(session, jid)
            ledger.settle(session, job, 0.0, _settling(allowances), now, cost=job.min_tokens)
        ending.canceled_running = moved[RUNNING]
        _ended(session, ending, moved[QUEUED] + moved[RUNNING], CANCELED, "job.canceled", job_json, now)
    elif isinstance(outcome, LeaseLapsed):
        _lease_lapsed(session, ending, outcome, job_json, now)
    elif isinstance(outcome, GivenBack):
        job_id = _one(job_id)
        if lifecycle.release(session, job_id, _owner(worker)):
            job = _reloaded(session, job_id)
            _requeued(ending, [(job.id, job.model, job.priority)])
    else:
        raise TypeError(f"not an outcome: {outcome!r}")
    return ending


def _one(job_id: str | None) -> str:
    if job_id is None:
        raise TypeError("this outcome ends one job: pass job_id")
    return job_id


def _owner(worker: str | None) -> str:
    if worker is None:
        raise TypeError("only the worker that owns the job's lease records this outcome: pass worker")
    return worker


def _settling(allowances: ledger.Allowances | None) -> ledger.Allowances:
    if allowances is None:
        raise TypeError("this outcome settles the job's tokens: pass allowances")
    return allowances


def _reloaded(session: Session, job_id: str) -> Job:
    """The job's row as the transition just left it (it exists: the transition matched it)."""
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    return job


def _ended(
    session: Session,
    ending: Ending,
    job_ids: list[str],
    status: str,
    event: str,
    job_json: JobJson | None,
    now: datetime,
    job: Job | None = None,
) -> None:
    """The part every terminal transition shares: the webhook outbox row (in this
    transaction, so a job's end and its announcement commit together) and the events.
    ``job``: the one job's row as this transaction left it, when the caller has it."""
    if not job_ids:
        return
    ending.moved.setdefault(status, []).extend(job_ids)
    for jid in job_ids:
        if job_json is not None:
            outbox.enqueue(session, jid, event, job_json, now, job=job if job is not None and job.id == jid else None)
        ending.events.append((jid, "status", {"status": status}))
        ending.events.append((jid, "done", {"status": status}))


def _requeued(ending: Ending, rows: list[tuple[str, str, Priority]]) -> None:
    ending.moved.setdefault(QUEUED, []).extend(r[0] for r in rows)
    ending.turns.extend(rows)
    ending.events.extend((r[0], "status", {"status": QUEUED}) for r in rows)


def _lease_lapsed(
    session: Session, ending: Ending, outcome: LeaseLapsed, job_json: JobJson | None, now: datetime
) -> None:
    """Jobs whose lease lapsed: failed ``worker_lost`` once their workers died with them
    ``max_attempts`` times (a poison job: a native crash, a CUDA fault), else queued again."""
    lapsed = list(
        session.execute(
            select(Job.id, Job.attempts)
            .where(Job.status == RUNNING, Job.lease_expires_at < now)
            .order_by(Job.lease_expires_at)
            .limit(outcome.limit)
        ).all()
    )
    poisoned = [jid for jid, attempts in lapsed if attempts >= outcome.max_attempts]
    lost: list[str] = []
    for jid in poisoned:
        message = (
            f"its worker stopped (died, hung or lost its connection) while running it, "
            f"{outcome.max_attempts} times; not tried again (VRAMQ_MAX_ATTEMPTS)"
        )
        if lifecycle.fail_lapsed(session, jid, WORKER_LOST, message, now):
            ledger.refund(session, jid, now, f"refund: job failed ({WORKER_LOST})")
            lost.append(jid)
    _ended(session, ending, lost, FAILED, "job.failed", job_json, now)
    retry = [jid for jid, attempts in lapsed if attempts < outcome.max_attempts]
    _requeued(ending, lifecycle.requeue_expired(session, retry, now))
