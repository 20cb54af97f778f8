"""Which queued job a worker takes next: fair between accounts within a priority.

Redis orders the priorities (``high`` before ``normal`` before ``low``: a message is a
turn at one model and priority, see jobs.queue). Within one model and priority, the
turn goes to the account (job owner) with the **fewest jobs of that model running now**;
among those equal, to the account whose oldest queued job is oldest; and within the
account, to its oldest job. So one account's 10,000 queued frames do not hold back
another account's single job: that account has nothing running, so it is served at the
next turn, and two busy accounts alternate (each turn goes to the one with fewer in
flight). One account alone gets every turn, so fairness costs no throughput.

This is per-account round robin weighted by what each account has in flight, decided
by two indexed queries per turn (``ix_jobs_fair``): their cost grows with the number of
accounts waiting, not with the length of their queues. Nothing has to be kept in step.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, and_, func, select, text
from sqlalchemy.orm import Session

from .lifecycle import QUEUED
from .queue import PRIORITY
from .schema import Job


def _queued(model: str, priority: str) -> ColumnElement[bool]:
    return and_(Job.model == model, Job.priority == priority, Job.status == QUEUED)


# The accounts with queued jobs at a model and priority, found by walking the index
# (``ix_jobs_fair``) from one account to the next instead of grouping every queued row:
# a turn costs one index probe per waiting account, however long their queues are.
_FAIREST_OWNER = text("""
WITH RECURSIVE owners(caller) AS (
    SELECT * FROM (SELECT caller FROM jobs WHERE model = :model AND priority = :priority AND status = 'queued'
                   AND caller IS NOT NULL ORDER BY caller LIMIT 1) AS first_owner
  UNION ALL
    SELECT (SELECT j.caller FROM jobs j
            WHERE j.model = :model AND j.priority = :priority AND j.status = 'queued' AND j.caller > owners.caller
            ORDER BY j.caller LIMIT 1)
    FROM owners WHERE owners.caller IS NOT NULL
),
load AS (
    SELECT caller, count(*) AS running FROM jobs WHERE model = :model AND status = 'running' GROUP BY caller
)
SELECT owners.caller,
       coalesce(load.running, 0) AS running,
       (SELECT q.created_at FROM jobs q
        WHERE q.model = :model AND q.priority = :priority AND q.status = 'queued' AND q.caller = owners.caller
        ORDER BY q.created_at LIMIT 1) AS oldest
FROM owners LEFT JOIN load ON load.caller = owners.caller
WHERE owners.caller IS NOT NULL
ORDER BY running, oldest, owners.caller
LIMIT 1
""")


def pick(session: Session, model: str, priority: str) -> str | None:
    """The id of the job the next turn at ``model``/``priority`` should take, or None."""
    owner = session.execute(_FAIREST_OWNER, {"model": model, "priority": priority}).scalar()
    who = Job.caller == owner if owner is not None else Job.caller.is_(None)  # None: jobs from before accounts
    return session.execute(
        select(Job.id).where(_queued(model, priority), who).order_by(Job.created_at, Job.id).limit(1)
    ).scalar()


def position(session: Session, job: Job) -> int | None:
    """About how many jobs are taken before this queued one (0 = next).

    Every queued job of the model at a higher priority, the owner's own jobs ahead of
    it (``r``), and from each other account with jobs queued at this priority as many as
    one turn each per round: ``min(its queued, r + 1)``. It ignores what is running, so it
    errs towards more.
    """
    if job.status != QUEUED:
        return None
    higher = [p for p, rank in PRIORITY.items() if rank < PRIORITY[job.priority]]
    before = 0
    if higher:
        before = session.execute(
            select(func.count())
            .select_from(Job)
            .where(Job.model == job.model, Job.status == QUEUED, Job.priority.in_(higher))
        ).scalar_one()
    owner = Job.caller.is_(None) if job.caller is None else Job.caller == job.caller
    own_ahead = session.execute(
        select(func.count())
        .select_from(Job)
        .where(
            _queued(job.model, job.priority),
            owner,
            (Job.created_at < job.created_at) | ((Job.created_at == job.created_at) & (Job.id < job.id)),
        )
    ).scalar_one()
    others = session.execute(
        select(Job.caller, func.count())
        .where(_queued(job.model, job.priority), ~owner if job.caller else Job.caller.is_not(None))
        .group_by(Job.caller)
    ).all()
    return before + own_ahead + sum(min(n, own_ahead + 1) for _, n in others)


def take_next(
    session: Session, model: str, priority: str, worker: str, lease_s: float, now: datetime | None = None
) -> str | None:
    """``take_next_job``'s job id."""
    job = take_next_job(session, model, priority, worker, lease_s, now)
    return None if job is None else job.id


def take_next_job(
    session: Session, model: str, priority: str, worker: str, lease_s: float, now: datetime | None = None
) -> Job | None:
    """Take the fairest queued job of ``model``/``priority`` for ``worker``; the job as
    taken, or None when none is queued. Run it in ``jobs.db.writing`` (SQLite: the write
    lock first).

    A lost race (another worker took the picked job first) picks again: each loss means
    a job was taken, so this ends; giving up early would waste the turn while jobs wait.
    """
    from .lifecycle import take

    while True:
        job_id = pick(session, model, priority)
        if job_id is None:
            return None
        job = take(session, job_id, worker, lease_s, now)
        if job is not None:
            return job
