"""Batches: many jobs submitted, followed, canceled and collected as one.

* **Accept.** ``POST /v1/batches`` takes ``{"jobs": [line, …]}`` or ``{"input_file":
  "file_…"}`` (JSONL, one line per job) of up to ``MAX_JOBS`` lines; a line is
  ``{"custom_id", "model", "input", "metadata"?}``. Every line is checked as a single job
  would be; any bad line rejects the whole batch (422), listing each bad line's number,
  field and reason. A good batch is one transaction: the batch row, every job row, each
  job's token reservation (one wallet lock) and its messages, all or nothing.
* **Run.** Jobs run like single jobs, at the batch's priority (``low`` unless asked
  otherwise), and share the GPUs with other accounts' jobs fairly (jobs.fairness).
* **Finish.** When no job of the batch is queued or running, ``finalize`` (run by the
  ``vramq webhooks`` dispatcher) writes the results manifest to the object store,
  ``batches/<id>/results.jsonl``: one line per job in submission order, ``custom_id``,
  ``job_id``, ``status``, ``output`` (signed links) and ``error``. Then the batch is
  ``completed`` (or stays ``canceled``) and ``batch.completed`` is sent.
* **Cancel.** Queued jobs are canceled and refunded in bulk; running ones are canceled
  (their workers stop between steps) and charged their minimum, like a single cancel.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from urllib.parse import urljoin
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import case, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import idempotency, ledger, outcomes, webhooks
from .accounts import Caller
from .errors import Conflict, InputError, NotFound, ServiceUnavailable, validation_errors
from .ids import new_id
from .lifecycle import CANCELED, FAILED, QUEUED, RUNNING, SUCCEEDED, utcnow
from .queue import publish
from .schema import Batch, Job
from .submit import Metadata, check_available, check_job, check_webhook
from .views import Links, iso, job_json

log = logging.getLogger("vramq.batches")

MAX_JOBS = 10_000
MAX_ERRORS_LISTED = 100
"""A rejected batch lists this many bad lines at most (and says how many there were)."""
MANIFEST_MAX_LINK_S = 7 * 24 * 3600
"""Links inside a manifest last until the outputs' retention ends, at most this (the
longest an S3 presigned URL may last)."""
OPEN = QUEUED
"""The stored status of a batch that has not finished (shown as queued or running)."""


class BatchLine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=64)
    input: dict[str, Any]
    metadata: Metadata = Field(default_factory=dict)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[Any] | None = Field(default=None, min_length=1, max_length=MAX_JOBS)
    input_file: str | None = Field(default=None, min_length=1, max_length=40)
    priority: Literal["high", "normal", "low"] = "low"
    metadata: Metadata = Field(default_factory=dict)
    webhook: dict[str, Any] | None = None


def _invalid(errors: list[dict], message: str = "the batch is invalid") -> InputError:
    return InputError(message, errors)


def parse_request(body: Any, max_jobs: int = MAX_JOBS, limit_note: str = "") -> BatchRequest:
    """The batch request, checked; ``jobs`` longer than ``max_jobs`` is 422 (``limit_note``
    says which setting made the limit lower than ``MAX_JOBS``)."""
    if not isinstance(body, dict):
        raise _invalid([{"loc": [], "msg": "must be a JSON object"}], "the body must be a JSON object")
    try:
        req = BatchRequest.model_validate(body)
    except ValidationError as exc:
        errors = validation_errors(exc)
        for error, e in zip(errors, exc.errors()):
            if e["type"] == "too_long" and error["loc"] == ["jobs"]:
                error["msg"] = f"a batch holds at most {MAX_JOBS} jobs"
        raise _invalid(errors) from None
    if (req.jobs is None) == (req.input_file is None):
        raise _invalid([{"loc": ["jobs"], "msg": "give either jobs (a list) or input_file (a JSONL file id), not both"}])
    if req.jobs is not None and len(req.jobs) > max_jobs:
        raise _invalid([{"loc": ["jobs"], "msg": f"a batch holds at most {max_jobs} jobs{limit_note}"}])
    return req


def _file_lines(services, file_id: str, caller: Caller, max_jobs: int = MAX_JOBS,
                limit_note: str = "") -> list[tuple[int, Any]]:
    """The JSONL file's lines as ``(line number, parsed value)``, blank lines skipped;
    counted before they are parsed, parsed strictly (jobs.strictjson)."""
    from . import strictjson
    from .files import get_file

    def bad(msg: str) -> InputError:
        return _invalid([{"loc": ["input_file"], "msg": msg}], f"input_file: {msg}")

    try:
        row = get_file(services, file_id)
    except NotFound:
        row = None
    if row is None or not caller.owns(row.caller):  # another caller's file does not exist for this one
        raise bad(f"no file {file_id} (upload the JSONL with POST /v1/files, purpose batch)")
    if row.purpose != "batch":
        raise bad(f"file {file_id} was uploaded with purpose {row.purpose!r}, not 'batch'")
    try:
        text = services.store.get(row.key).decode("utf-8")
    except Exception as exc:
        raise ServiceUnavailable(f"could not read {file_id} from storage: {exc.__class__.__name__}") from exc
    raw_lines = [(number, raw) for number, raw in enumerate(text.splitlines(), 1) if raw.strip()]
    if len(raw_lines) > max_jobs:
        raise bad(f"the file has {len(raw_lines)} jobs; a batch holds at most {max_jobs}{limit_note}")
    # The upload checked every line (jobs.files); a file stored before that check was
    # strict is checked again here.
    lines = []
    for number, raw in raw_lines:
        try:
            lines.append((number, strictjson.loads(raw, ["input_file", "line", number])))
        except ValueError as exc:
            raise bad(f"line {number} is not valid JSON: {exc}") from None
    return lines


def _check_lines(services, lines: list[tuple[int, Any]], caller: Caller, where: str) -> list[dict]:
    """Check every line as a job; return the jobs' fields, or raise 422 listing the bad
    lines (``loc`` is ``[where, index, field…]``, ``line`` the 1-based line number)."""
    errors: list[dict] = []
    checked: list[dict] = []
    seen: dict[str, int] = {}
    bad_lines: list[int] = []
    for index, (number, raw) in enumerate(lines):
        base = [where, index] if where == "jobs" else [where, "line", number]
        line_errors = []
        if not isinstance(raw, dict):
            line_errors.append({"loc": base, "msg": "must be a JSON object"})
        else:
            try:
                line = BatchLine.model_validate(raw)
                entry, inp, units = check_job(services, line.model, line.input, caller)
                if line.custom_id in seen:
                    raise InputError("", [{"loc": ["custom_id"], "msg": f"custom_id {line.custom_id!r} is also on "
                                                                          f"line {seen[line.custom_id]}"}])
                seen[line.custom_id] = number
                checked.append({"line": line, "entry": entry, "input": inp, "units": units})
            except ValidationError as exc:
                line_errors += validation_errors(exc, base)
            except InputError as exc:
                line_errors += [{**e, "loc": base + list(e["loc"])} for e in exc.errors] or [
                    {"loc": base, "msg": str(exc)}]
        if line_errors:
            bad_lines.append(number)
            for e in line_errors:
                if len(errors) < MAX_ERRORS_LISTED:
                    errors.append({**e, "line": number})
    if bad_lines:
        more = f"; the first {MAX_ERRORS_LISTED} errors are listed" if len(errors) >= MAX_ERRORS_LISTED else ""
        raise _invalid(errors, f"{len(bad_lines)} of {len(lines)} lines are invalid (lines "
                               f"{', '.join(map(str, bad_lines[:10]))}{', …' if len(bad_lines) > 10 else ''})"
                               f"; nothing was queued{more}")
    return checked


def create(services, body: Any, *, caller: Caller, idempotency_key: str | None = None,
           base_url: str | None = None, max_jobs: int = MAX_JOBS, limit_note: str = "") -> tuple[Batch, bool]:
    """Check, price and enqueue a batch in one transaction. Returns ``(batch, created)``.
    ``base_url``: the API's address as the caller reached it (for the manifest's links);
    ``max_jobs``: this caller's limit (at most ``MAX_JOBS``; ``limit_note`` names its setting)."""
    max_jobs = min(max_jobs, MAX_JOBS)
    req = parse_request(body, max_jobs, limit_note)
    if req.jobs is not None:
        lines = [(i + 1, raw) for i, raw in enumerate(req.jobs)]
        checked = _check_lines(services, lines, caller, "jobs")
    else:
        file_lines = _file_lines(services, req.input_file, caller, max_jobs, limit_note)
        checked = _check_lines(services, file_lines, caller, "input_file")
    webhook = check_webhook(services, req.webhook, caller, batch=True)
    job_events = [e for e in webhook["events"] if e in webhooks.JOB_EVENTS] if webhook else []
    job_webhook = {"url": webhook["url"], "events": job_events} if job_events else None

    body_digest = idempotency.digest(body) if idempotency_key else None
    existing = idempotency.replayed(services, caller.holder, idempotency_key, body_digest, Batch)
    if existing is not None:
        return existing, False
    for model_id in sorted({c["entry"].id for c in checked}):
        check_available(services, model_id)

    metered = not caller.admin
    now = services.now()
    batch = Batch(id=new_id("batch"), caller=caller.holder, status=OPEN, priority=req.priority, total=len(checked),
                  meta=req.metadata, webhook=webhook, input_file=req.input_file, base_url=base_url,
                  created_at=now)
    rows, reservations, per_model = [], [], {}
    for c in checked:
        entry = c["entry"]
        quote = services.estimator.quote(entry, c["units"])
        job_id = new_id("job")
        rows.append({
            "id": job_id, "model": entry.id, "kind": entry.kind, "status": QUEUED, "priority": req.priority,
            "input": c["input"], "meta": c["line"].metadata, "progress": 0.0, "created_at": now, "attempts": 0,
            "gpu_seconds": 0.0, "tokens_reserved": quote.tokens if metered else 0, "tokens_charged": 0,
            "work_units": c["units"], "price_rate": quote.rate, "min_tokens": quote.min_tokens, "usage_detail": {},
            "caller": caller.holder, "saved": False, "webhook": job_webhook, "batch_id": batch.id,
            "custom_id": c["line"].custom_id,
        })
        if metered:
            reservations.append((job_id, quote.tokens))
        per_model[entry.id] = per_model.get(entry.id, 0) + 1
    try:
        with services.sessions.begin() as session:
            if metered:  # first: the wallet lock is this transaction's first write
                ledger.reserve_many(session, caller.holder, services.allowances.for_tier(caller.tier),
                                    reservations, now)
            session.add(batch)
            session.flush()
            session.execute(insert(Job), rows)
            if idempotency_key:
                idempotency.remember(session, caller.holder, idempotency_key, body_digest, batch.id)
            session.flush()
            try:
                for model_id, count in per_model.items():
                    publish(services.celery, batch.id, model_id, req.priority, count=count)
            except Exception as exc:
                raise ServiceUnavailable(f"broker unreachable, batch not accepted: {exc.__class__.__name__}") from exc
    except IntegrityError:
        existing = idempotency.replayed(services, caller.holder, idempotency_key, body_digest, Batch)
        if existing is None:
            raise
        return existing, False
    return batch, True


# --- reading -------------------------------------------------------------------------


def summary(session: Session, batch_id: str) -> dict:
    """Counts by status and the usage so far, from the batch's jobs (one query)."""
    rows = session.execute(
        select(Job.status, func.count(), func.coalesce(func.sum(Job.gpu_seconds), 0.0),
               func.coalesce(func.sum(Job.tokens_charged), 0), func.coalesce(func.sum(Job.tokens_reserved), 0))
        .where(Job.batch_id == batch_id).group_by(Job.status)
    ).all()
    counts = {s: 0 for s in (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)}
    gpu = charged = reserved = 0
    for status, n, g, c, r in rows:
        counts[status] = n
        gpu, charged, reserved = gpu + g, charged + c, reserved + r
    counts["total"] = sum(counts.values())
    return {"counts": counts, "usage": {"gpu_seconds": round(float(gpu), 6), "tokens_charged": int(charged),
                                        "tokens_reserved": int(reserved)}}


def status_of(batch: Batch, counts: dict) -> str:
    if batch.status != OPEN:
        return batch.status
    return QUEUED if counts[QUEUED] == counts["total"] else RUNNING


def batch_json(batch: Batch, summary_: dict, links: Links) -> dict:
    self_url = urljoin(links.base, f"v1/batches/{batch.id}")
    return {
        "id": batch.id,
        "object": "batch",
        "status": status_of(batch, summary_["counts"]),
        "priority": batch.priority,
        "counts": summary_["counts"],
        "results_url": links.signed(batch.results_key) if batch.results_key else None,
        "created_at": iso(batch.created_at),
        "canceled_at": iso(batch.canceled_at),
        "finished_at": iso(batch.finished_at),
        "usage": summary_["usage"],
        "metadata": batch.meta,
        "input_file": batch.input_file,
        "links": {"self": self_url, "jobs": self_url + "/jobs", "cancel": self_url + "/cancel",
                  "events": self_url + "/events"},
    }


def page(session: Session, batch_id: str, after: str | None, limit: int, statuses: list[str] | None = None) -> list[Job]:
    """The batch's jobs in submission order (job ids sort by it), after job id ``after``."""
    q = select(Job).where(Job.batch_id == batch_id)
    if after:
        q = q.where(Job.id > after)
    if statuses:
        q = q.where(Job.status.in_(statuses))
    return list(session.execute(q.order_by(Job.id).limit(limit)).scalars())


# --- cancel --------------------------------------------------------------------------


def cancel(services, batch_id: str, now: datetime | None = None, render=None) -> dict:
    """Cancel the batch: queued jobs canceled and refunded, running ones canceled (their
    workers stop between steps) and charged their minimum. Conflict if it had finished.
    Returns ``{"queued": n, "running": n}``, the jobs canceled from each state."""
    now = now or services.now()
    with services.sessions.begin() as session:
        won = session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == OPEN)
                              .values(status=CANCELED, canceled_at=now)).rowcount
        if not won:
            status = session.execute(select(Batch.status).where(Batch.id == batch_id)).scalar()
            if status is None:
                raise NotFound(f"no batch {batch_id}")
            raise Conflict(f"batch {batch_id} already {status}")
        ending = outcomes.end(session, outcomes.Canceled(), where=Job.batch_id == batch_id,
                              allowances=services.allowances, render=render, now=now)
    canceled = ending.ids(CANCELED)
    running = ending.canceled_running
    # Event streams: the running jobs' followers hear it now (their workers stop between
    # steps); a queued job's stream is only read while it is followed, so they are
    # announced only up to a bound, not 10,000 round trips in the request.
    if len(canceled) > 1000:
        keep = set(running)
        ending.events = [e for e in ending.events if e[0] in keep]
    ending.announce(services.redis)
    return {QUEUED: len(canceled) - len(running), RUNNING: len(running)}


# --- finishing -----------------------------------------------------------------------


def due(session: Session, limit: int = 20) -> list[str]:
    """Batches not yet finalized none of whose jobs is queued or running."""
    unfinished = exists().where(Job.batch_id == Batch.id, Job.status.in_((QUEUED, RUNNING)))
    return list(session.execute(
        select(Batch.id).where(Batch.finished_at.is_(None), ~unfinished).order_by(Batch.created_at).limit(limit)
    ).scalars())


def manifest(session: Session, batch: Batch, links: Links) -> bytes:
    """The results, one JSON line per job in submission order."""
    out = []
    after = None
    while True:
        jobs = page(session, batch.id, after, 1000)
        if not jobs:
            break
        for job in jobs:
            rendered = job_json(job, links)
            out.append(json.dumps({"custom_id": job.custom_id, "job_id": job.id, "status": job.status,
                                   "output": rendered["output"], "error": rendered["error"]},
                                  separators=(",", ":")))
        after = jobs[-1].id
    return ("\n".join(out) + "\n").encode()


def finalize(services, batch_id: str) -> bool:
    """Write the manifest of a batch whose jobs have all ended, mark it finished, and
    announce ``batch.completed``. True if this call finished it (several dispatchers may
    race: the manifest is written the same by each, the status only once).

    Links point at ``VRAMQ_PUBLIC_URL``, else at the address the batch was submitted to;
    those inside the manifest last as long as the outputs are kept (at most 7 days)."""
    settings = services.settings
    with services.sessions() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.finished_at is not None:
            return False
        base = settings.public_url or batch.base_url or ""
        links = Links(services.store, settings.link_ttl, base)
        manifest_links = Links(services.store, min(max(settings.link_ttl, settings.retention_hours * 3600),
                                                   MANIFEST_MAX_LINK_S), base)
        data = manifest(session, batch, manifest_links)
    key = f"batches/{batch_id}/results.jsonl"
    services.store.put(key, data, "application/jsonl")
    now = utcnow()
    with services.sessions.begin() as session:
        won = session.execute(
            update(Batch).where(Batch.id == batch_id, Batch.finished_at.is_(None))
            .values(finished_at=now, results_key=key,
                    status=case((Batch.status == OPEN, "completed"), else_=Batch.status))
        ).rowcount
        if won:
            batch = session.get(Batch, batch_id, populate_existing=True)
            webhooks.enqueue_batch(session, batch, "batch.completed", batch_json(batch, summary(session, batch_id),
                                                                                 links), now)
    if won:
        log.info("batch %s finished: %d jobs, results at %s", batch_id, batch.total, key)
    return bool(won)


class Finisher:
    """Finalizes due batches, at most once a second; a batch whose manifest could not be
    written (storage down) is tried again after ``retry_s``."""

    def __init__(self, services, every_s: float = 1.0, retry_s: float = 30.0):
        self.services, self.every_s, self.retry_s = services, every_s, retry_s
        self._next = 0.0
        self._failed: dict[str, float] = {}

    def tick(self) -> int:
        import time

        now = time.monotonic()
        if now < self._next:
            return 0
        self._next = now + self.every_s
        with self.services.sessions() as session:
            ids = [b for b in due(session) if self._failed.get(b, 0) <= now]
        done = 0
        for batch_id in ids:
            try:
                done += finalize(self.services, batch_id)
                self._failed.pop(batch_id, None)
            except Exception:  # storage down: the batch stays due
                log.exception("batch %s: writing the results failed; retrying in %g s", batch_id, self.retry_s)
                self._failed[batch_id] = now + self.retry_s
        return done
