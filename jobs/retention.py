"""Keeping, sharing and expiring results: nothing a caller sent or got is stored for
ever unless they save it.

* A finished job's outputs live until ``expires_at`` (``VRAMQ_RETENTION_HOURS`` after it
  succeeded) unless the owner **saves** the job. ``sweep`` (run every
  ``VRAMQ_SWEEP_SECONDS`` by ``vramq sweeper``, which ``vramq up`` starts) deletes the
  objects of expired, unsaved jobs; the row stays, with ``outputs_expired_at`` set and
  its output gone, so history still shows what was asked and what it cost.
* ``save`` and the sweep race safely: each is one conditional UPDATE, and the sweep
  marks a job before deleting its objects, so a job is either saved (objects kept) or
  expired (objects deleted), never saved with its objects gone.
* A **share** is a random token naming one job; ``/s/<token>`` shows the job's result to
  anyone until the owner revokes it or the job's outputs expire (the sweep revokes it
  then). Revoked shares are deleted ``VRAMQ_RETENTION_HOURS`` after their revocation.
  One live share per job: sharing again returns it.
* The sweep also deletes uploaded files ``VRAMQ_UPLOAD_RETENTION_HOURS`` after upload
  (never while a queued or running job or an unfinished batch refers to one), batch
  results manifests ``VRAMQ_RETENTION_HOURS`` after the batch finished, and
  ``Idempotency-Key`` records older than ``VRAMQ_IDEMPOTENCY_HOURS``. Objects go first,
  rows after, so a store that is down loses nothing: the row stays and the next sweep
  retries. Job rows and ledger rows are history and are kept.
* Each sweep adds what it deleted to the Redis hash ``DELETED_KEY``; the API exports the
  totals as ``vramq_retention_deleted_total{what}`` (api.metrics).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, ClassVar

from sqlalchemy import delete, exists, null, select, update
from sqlalchemy.orm import Session

from .db import rowcount
from .errors import Conflict
from .files import File, delete_object
from .lifecycle import QUEUED, RUNNING, SUCCEEDED
from .schema import Batch, IdempotencyKey, Job, Share

if TYPE_CHECKING:
    from redis import Redis

    from .services import Services

log = logging.getLogger("vramq.retention")

DELETED_KEY = "vramq:retention:deleted"
"""Redis hash: class of thing (``SweepReport.CLASSES``) -> how many every sweep deleted."""


def save(session: Session, job: Job, keep: bool = True) -> None:
    """Pin (or unpin) a job's outputs. Conflict if they have already expired."""
    result = session.execute(update(Job).where(Job.id == job.id, Job.outputs_expired_at.is_(None)).values(saved=keep))
    if rowcount(result) != 1:
        raise Conflict(f"the outputs of job {job.id} have expired and were deleted; there is nothing to save")


def share(session: Session, job: Job, now: datetime) -> Share:
    """The job's live share link, made if there is none."""
    live = (
        session.execute(
            select(Share).where(Share.job_id == job.id, Share.revoked_at.is_(None)).order_by(Share.created_at)
        )
        .scalars()
        .first()
    )
    if live is not None:
        return live
    row = Share(token=secrets.token_urlsafe(24), job_id=job.id, created_at=now)
    session.add(row)
    session.flush()
    return row


def unshare(session: Session, job: Job, now: datetime) -> int:
    """Revoke every live share of the job; return how many were revoked."""
    return rowcount(
        session.execute(update(Share).where(Share.job_id == job.id, Share.revoked_at.is_(None)).values(revoked_at=now))
    )


def shared_job(session: Session, token: str) -> Job | None:
    share_row = session.get(Share, token)
    if share_row is None or share_row.revoked_at is not None:
        return None
    return session.get(Job, share_row.job_id)


@dataclass
class SweepReport:
    """What one sweep deleted, per class of stored thing: ids where a log line may name
    them, counts where the ids are secrets (share tokens) or many."""

    CLASSES: ClassVar[tuple[str, ...]] = ("outputs", "files", "manifests", "shares", "idempotency_keys")

    outputs: list[str] = field(default_factory=list)
    """Jobs whose outputs were deleted."""
    files: list[str] = field(default_factory=list)
    """Uploaded files deleted (object and row)."""
    manifests: list[str] = field(default_factory=list)
    """Batches whose results manifest was deleted."""
    shares: int = 0
    """Share rows deleted (revoked long enough ago)."""
    idempotency_keys: int = 0
    shares_revoked: int = 0
    """Live shares revoked because their job's outputs expired (deleted in a later sweep)."""

    def counts(self) -> dict[str, int]:
        """How many of each class were deleted, for the metrics."""
        out: dict[str, int] = {}
        for what in self.CLASSES:
            value = getattr(self, what)
            out[what] = value if isinstance(value, int) else len(value)
        return out

    def __bool__(self) -> bool:
        return any(self.counts().values()) or self.shares_revoked > 0

    def describe(self) -> str:
        c = self.counts()
        return (
            f"expired the outputs of {c['outputs']} jobs; deleted {c['files']} uploaded files, "
            f"{c['manifests']} batch manifests, {c['shares']} revoked shares, "
            f"{c['idempotency_keys']} idempotency keys; revoked {self.shares_revoked} shares of expired jobs"
        )


def sweep(services: Services, now: datetime, limit: int = 500) -> SweepReport:
    """Delete everything past its time (see the module's docstring); return what went.

    Each class is swept on its own, objects before rows, so one that cannot be reached
    (storage down) keeps its rows and is retried by the next sweep while the others go
    on. The totals are added to ``DELETED_KEY`` in Redis for the API's /metrics.
    """
    settings = services.settings
    kept = timedelta(hours=settings.retention_hours)
    report = SweepReport(outputs=_sweep_outputs(services, now, limit))
    report.shares_revoked = _revoke_expired_shares(services, now)
    report.shares = _delete_revoked_shares(services, now - kept)
    report.files = _sweep_files(services, now - timedelta(hours=settings.upload_retention_hours), limit)
    report.manifests = _sweep_manifests(services, now - kept, limit)
    report.idempotency_keys = _delete_idempotency_keys(services, now - timedelta(hours=settings.idempotency_hours))
    _add_to_totals(services, report)
    return report


def _sweep_outputs(services: Services, now: datetime, limit: int) -> list[str]:
    """Delete the outputs of unsaved jobs past ``expires_at``; return the job ids swept.

    Two steps, so storage being down loses nothing: a job is first *marked*
    (``outputs_expired_at``; from then on it shows no output and cannot be saved), then
    its objects are deleted and its ``output`` cleared. A job marked but not cleared is
    retried by every later sweep until its objects are gone.
    """
    while True:
        with services.sessions.begin() as session:
            due = (
                select(Job.id)
                .where(
                    Job.status == SUCCEEDED,
                    Job.saved.is_(False),
                    Job.outputs_expired_at.is_(None),
                    Job.expires_at.is_not(None),
                    Job.expires_at <= now,
                )
                .limit(limit)
                .scalar_subquery()
            )
            # One statement finds and marks: concurrent sweepers get disjoint sets, and
            # a ``save`` that commits first keeps its job out.
            marked = session.execute(
                update(Job)
                .where(Job.id.in_(due), Job.saved.is_(False), Job.outputs_expired_at.is_(None))
                .values(outputs_expired_at=now)
                .returning(Job.id)
            ).all()
        if len(marked) < limit:
            break
    swept: list[str] = []
    with services.sessions() as session:
        pending = list(
            session.execute(
                select(Job.id).where(Job.outputs_expired_at.is_not(None), Job.output.is_not(None)).limit(10 * limit)
            ).scalars()
        )
    for job_id in pending:
        if not _deleted(partial(services.store.delete_prefix, f"jobs/{job_id}/"), "the outputs of job", job_id):
            continue
        with services.sessions.begin() as session:
            session.execute(update(Job).where(Job.id == job_id).values(output=null()))  # SQL NULL, not JSON null
        swept.append(job_id)
    return swept


def _deleted(delete_objects: Callable[[], object], what: str, ident: str) -> bool:
    """Run ``delete_objects``; False (and a warning) if the store failed: the row that
    names the objects is kept, so the next sweep tries again and nothing is lost."""
    try:
        delete_objects()
    except Exception as exc:  # any store error: keep the row, retry next sweep
        log.warning("could not delete %s %s (%s); the next sweep retries", what, ident, exc)
        return False
    return True


def _revoke_expired_shares(services: Services, now: datetime) -> int:
    """Revoke the live shares of jobs whose outputs have expired: a public link must not
    outlive what it shows. Covers every expired job, so shares of jobs expired before
    this rule existed are revoked too."""
    expired = select(Job.id).where(Job.outputs_expired_at.is_not(None))
    with services.sessions.begin() as session:
        return rowcount(
            session.execute(
                update(Share).where(Share.revoked_at.is_(None), Share.job_id.in_(expired)).values(revoked_at=now)
            )
        )


def _delete_revoked_shares(services: Services, cutoff: datetime) -> int:
    """Delete share rows revoked before ``cutoff`` (a revoked token answers 404 either way)."""
    with services.sessions.begin() as session:
        return rowcount(session.execute(delete(Share).where(Share.revoked_at <= cutoff)))


def _files_due(session: Session, cutoff: datetime, limit: int) -> list[str]:
    """Files uploaded before ``cutoff`` that no queued or running job (a speech job's
    ``input.audio``) and no unfinished batch (``input_file``) refers to."""
    wanted_by_job = exists().where(Job.status.in_((QUEUED, RUNNING)), Job.input["audio"].as_string() == File.id)
    wanted_by_batch = exists().where(Batch.finished_at.is_(None), Batch.input_file == File.id)
    return list(
        session.execute(
            select(File.id)
            .where(File.created_at <= cutoff, ~wanted_by_job, ~wanted_by_batch)
            .order_by(File.created_at)
            .limit(limit)
        ).scalars()
    )


def _sweep_files(services: Services, cutoff: datetime, limit: int) -> list[str]:
    """Delete uploaded files past their time, the object first, then the row: a row
    whose object could not be deleted stays and is retried by the next sweep. Once the
    row is gone the file id is 404 like any unknown id (a job submitted with it in the
    instant between the check and the delete fails at its worker: no such file)."""
    with services.sessions() as session:
        due = _files_due(session, cutoff, 10 * limit)
    swept: list[str] = []
    for file_id in due:
        if not _deleted(partial(delete_object, services.store, file_id), "uploaded file", file_id):
            continue
        with services.sessions.begin() as session:
            session.execute(delete(File).where(File.id == file_id))
        swept.append(file_id)
    return swept


def _sweep_manifests(services: Services, cutoff: datetime, limit: int) -> list[str]:
    """Delete the results manifests of batches finished before ``cutoff``, then clear
    ``results_key`` (the batch then shows ``results_url: null``). A manifest that could
    not be deleted keeps its key, so its link still works and the next sweep retries."""
    with services.sessions() as session:
        due = list(
            session.execute(
                select(Batch.id).where(Batch.results_key.is_not(None), Batch.finished_at <= cutoff).limit(10 * limit)
            ).scalars()
        )
    swept: list[str] = []
    for batch_id in due:
        folder = f"batches/{batch_id}/"
        if not _deleted(partial(services.store.delete_prefix, folder), "the manifest of batch", batch_id):
            continue
        with services.sessions.begin() as session:
            session.execute(update(Batch).where(Batch.id == batch_id).values(results_key=None))
        swept.append(batch_id)
    return swept


def _delete_idempotency_keys(services: Services, cutoff: datetime) -> int:
    """Delete ``Idempotency-Key`` records made before ``cutoff``: past the window they
    no longer replay anything (jobs.idempotency), so they are dead weight."""
    with services.sessions.begin() as session:
        return rowcount(session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff)))


def _add_to_totals(services: Services, report: SweepReport) -> None:
    """Add the sweep's counts to ``DELETED_KEY`` in Redis. The sweeper is a process of
    its own; the API's /metrics reads the totals there. Redis being down costs these
    counts (logged), never the sweep."""
    import redis

    counts = {what: n for what, n in report.counts().items() if n}
    if not counts:
        return
    try:
        with services.redis.pipeline() as pipe:
            for what, n in counts.items():
                pipe.hincrby(DELETED_KEY, what, n)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not add the sweep's counts %s to the metrics in Redis (%s)", counts, exc)


def deleted_totals(redis_client: Redis) -> dict[str, int]:
    """Everything every sweep deleted so far, per class (0 for a class never swept)."""
    raw = redis_client.hgetall(DELETED_KEY)
    totals = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in raw.items()}
    return {what: totals.get(what, 0) for what in SweepReport.CLASSES}
