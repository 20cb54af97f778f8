"""Accepting a batch: every line checked, then the batch row, its job rows, their token
reservations (one wallet lock) and their turns in one transaction, all or nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import insert

from .. import idempotency, ledger
from ..accounts import Caller
from ..errors import ServiceUnavailable
from ..ids import new_id
from ..queue import publish
from ..schema import Batch, Job
from ..submit import check_available, check_webhook, job_row
from ..webhooks.spec import JOB_EVENTS
from .parsing import MAX_JOBS, check_lines, file_lines, parse_request
from .views import OPEN

if TYPE_CHECKING:
    from ..services import Services


def create(
    services: Services,
    body: Any,
    *,
    caller: Caller,
    idempotency_key: str | None = None,
    base_url: str | None = None,
    max_jobs: int = MAX_JOBS,
    limit_note: str = "",
) -> tuple[Batch, bool]:
    """Check, price and enqueue a batch in one transaction. Returns ``(batch, created)``.
    ``base_url``: the API's address as the caller reached it (for the manifest's links);
    ``max_jobs``: this caller's limit (at most ``MAX_JOBS``; ``limit_note`` names its setting)."""
    max_jobs = min(max_jobs, MAX_JOBS)
    req = parse_request(body, max_jobs, limit_note)
    if req.jobs is not None:
        lines = [(i + 1, raw) for i, raw in enumerate(req.jobs)]
        checked = check_lines(services, lines, caller, "jobs")
    else:
        assert req.input_file is not None  # parse_request: exactly one of jobs and input_file
        checked = check_lines(
            services, file_lines(services, req.input_file, caller, max_jobs, limit_note), caller, "input_file"
        )
    webhook = check_webhook(services, req.webhook, caller, batch=True)
    job_events = [e for e in webhook["events"] if e in JOB_EVENTS] if webhook else []
    job_webhook = {"url": webhook["url"], "events": job_events} if webhook and job_events else None

    def make(remember: idempotency.Remember) -> Batch:
        for model_id in sorted({c["entry"].id for c in checked}):
            check_available(services, model_id)
        metered = not caller.admin
        now = services.now()
        batch = Batch(
            id=new_id("batch"),
            caller=caller.id,
            status=OPEN,
            priority=req.priority,
            total=len(checked),
            meta=req.metadata,
            webhook=webhook,
            input_file=req.input_file,
            base_url=base_url,
            created_at=now,
        )
        rows: list[dict[str, Any]] = []
        reservations: list[tuple[str, int]] = []
        per_model: dict[str, int] = {}
        for c in checked:
            entry = c["entry"]
            quote = services.estimator.quote(entry, c["units"])
            row = job_row(
                entry,
                c["input"],
                c["units"],
                quote,
                caller=caller,
                priority=req.priority,
                metadata=c["line"].metadata,
                webhook=job_webhook,
                now=now,
                batch_id=batch.id,
                custom_id=c["line"].custom_id,
            )
            rows.append(row)
            if metered:
                reservations.append((row["id"], quote.tokens))
            per_model[entry.id] = per_model.get(entry.id, 0) + 1
        with services.sessions.begin() as session:
            if metered:  # first: the wallet lock is this transaction's first write
                ledger.reserve_many(session, caller.id, services.allowances.for_tier(caller.tier), reservations, now)
            session.add(batch)
            session.flush()
            session.execute(insert(Job), rows)
            remember(session, batch.id)
            session.flush()
            try:
                for model_id, count in per_model.items():
                    publish(services.celery, batch.id, model_id, req.priority, count=count)
            except Exception as exc:
                raise ServiceUnavailable(f"broker unreachable, batch not accepted: {exc.__class__.__name__}") from exc
        return batch

    return idempotency.once(services, caller.id, idempotency_key, body, make, idempotency.row_of(services, Batch))
