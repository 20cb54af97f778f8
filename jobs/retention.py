"""Keeping, sharing and expiring results.

* A finished job's outputs live until ``expires_at`` (``VRAMQ_RETENTION_HOURS`` after it
  succeeded) unless the owner **saves** the job. ``sweep`` (run every
  ``VRAMQ_SWEEP_SECONDS`` by ``vramq sweeper``, which ``vramq up`` starts) deletes the
  objects of expired, unsaved jobs; the row stays, with ``outputs_expired_at`` set and
  its output gone, so history still shows what was asked and what it cost.
* ``save`` and the sweep race safely: each is one conditional UPDATE, and the sweep
  marks a job before deleting its objects, so a job is either saved (objects kept) or
  expired (objects deleted), never saved with its objects gone.
* A **share** is a random token naming one job; ``/s/<token>`` shows the job's result to
  anyone until the owner revokes it. One live share per job: sharing again returns it.
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime

from sqlalchemy import null, select, update
from sqlalchemy.orm import Session

from .errors import Conflict
from .lifecycle import SUCCEEDED
from .schema import Job, Share

log = logging.getLogger("vramq.retention")


def save(session: Session, job: Job, keep: bool = True) -> None:
    """Pin (or unpin) a job's outputs. Conflict if they have already expired."""
    result = session.execute(
        update(Job).where(Job.id == job.id, Job.outputs_expired_at.is_(None)).values(saved=keep)
    )
    if result.rowcount != 1:
        raise Conflict(f"the outputs of job {job.id} have expired and were deleted; there is nothing to save")


def share(session: Session, job: Job, now: datetime) -> Share:
    """The job's live share link, made if there is none."""
    live = session.execute(
        select(Share).where(Share.job_id == job.id, Share.revoked_at.is_(None)).order_by(Share.created_at)
    ).scalars().first()
    if live is not None:
        return live
    row = Share(token=secrets.token_urlsafe(24), job_id=job.id, created_at=now)
    session.add(row)
    session.flush()
    return row


def unshare(session: Session, job: Job, now: datetime) -> int:
    """Revoke every live share of the job; return how many were revoked."""
    return session.execute(
        update(Share).where(Share.job_id == job.id, Share.revoked_at.is_(None)).values(revoked_at=now)
    ).rowcount


def shared_job(session: Session, token: str) -> Job | None:
    share_row = session.get(Share, token)
    if share_row is None or share_row.revoked_at is not None:
        return None
    return session.get(Job, share_row.job_id)


def sweep(services, now: datetime, limit: int = 500) -> list[str]:
    """Delete the outputs of unsaved jobs past ``expires_at``; return the job ids swept.

    Two steps, so storage being down loses nothing: a job is first *marked*
    (``outputs_expired_at``; from then on it shows no output and cannot be saved), then
    its objects are deleted and its ``output`` cleared. A job marked but not cleared is
    retried by every later sweep until its objects are gone.
    """
    while True:
        with services.sessions.begin() as session:
            due = select(Job.id).where(
                Job.status == SUCCEEDED, Job.saved.is_(False), Job.outputs_expired_at.is_(None),
                Job.expires_at.is_not(None), Job.expires_at <= now,
            ).limit(limit).scalar_subquery()
            # One statement finds and marks: concurrent sweepers get disjoint sets, and
            # a ``save`` that commits first keeps its job out.
            marked = session.execute(
                update(Job).where(Job.id.in_(due), Job.saved.is_(False), Job.outputs_expired_at.is_(None))
                .values(outputs_expired_at=now).returning(Job.id)
            ).all()
        if len(marked) < limit:
            break
    swept: list[str] = []
    with services.sessions() as session:
        pending = list(session.execute(
            select(Job.id).where(Job.outputs_expired_at.is_not(None), Job.output.is_not(None)).limit(10 * limit)
        ).scalars())
    for job_id in pending:
        try:
            services.store.delete_prefix(f"jobs/{job_id}/")
        except Exception as exc:
            log.warning("could not delete the objects of expired job %s (%s); the next sweep retries", job_id, exc)
            continue
        with services.sessions.begin() as session:
            session.execute(update(Job).where(Job.id == job_id).values(output=null()))  # SQL NULL, not JSON null
        swept.append(job_id)
    return swept
