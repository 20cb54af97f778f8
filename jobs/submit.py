"""Accepting a job: validate against the catalog, write the row, publish the message.

The message is published inside the database transaction, just before it commits, so
there is never a committed ``queued`` job without a message (which no worker would
ever run). The opposite gap, a message whose transaction then fails to commit, is
harmless: the worker finds no job row and drops the message after a short grace.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, cast

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Table, insert

from . import idempotency, ledger
from .accounts import Caller
from .catalog import SEED_MAX
from .errors import InputError, ModelUnavailable, ServiceUnavailable, validation_errors
from .ids import new_id
from .lifecycle import QUEUED
from .pricing import work_units
from .priorities import Priority
from .queue import publish
from .schema import Job

if TYPE_CHECKING:
    from .catalog import ModelEntry
    from .pricing import Quote
    from .services import Services

MAX_METADATA_BYTES = 4096

#: The language codes Whisper knows, as faster-whisper checks them on the worker
#: (``faster_whisper.tokenizer._LANGUAGE_CODES``, faster-whisper 1.2.1; ``yue`` is
#: large-v3's). Copied, not imported: the API does not install faster-whisper.
WHISPER_LANGUAGES = frozenset(
    """
    af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu ha haw he hi hr ht hu
    hy id is it ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml mn mr ms mt my ne nl nn no oc pa pl ps pt
    ro ru sa sd si sk sl sn so sq sr su sv sw ta te tg th tk tl tr tt uk ur uz vi yi yo zh yue""".split()
)


def _small(v: dict[str, Any]) -> dict[str, Any]:
    if len(json.dumps(v)) > MAX_METADATA_BYTES:
        raise ValueError(f"must encode to at most {MAX_METADATA_BYTES} bytes of JSON")
    return v


Metadata = Annotated[dict[str, Any], AfterValidator(_small)]
"""A job's or batch's ``metadata``: any JSON object of at most ``MAX_METADATA_BYTES``."""


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=64)
    input: dict[str, Any]
    priority: Priority = "normal"
    metadata: Metadata = Field(default_factory=dict)
    webhook: dict[str, Any] | None = None
    """``{"url", "events"?}``: checked by ``check_webhook``."""


def parse_request(body: Any) -> JobRequest:
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object", [{"loc": [], "msg": "must be a JSON object"}])
    try:
        return JobRequest.model_validate(body)
    except ValidationError as exc:
        raise InputError("the request body is invalid", validation_errors(exc)) from None


def submit_job(
    services: Services, body: Any, *, caller: Caller, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """Validate, price and enqueue one job. Returns ``(job, created)``; ``created`` is
    False when an earlier request with the same ``Idempotency-Key`` and body made it.

    The job's estimated cost is reserved from the caller's tokens in the transaction
    that writes the job (402 ``quota_exceeded`` when they do not cover it); the worker
    settles it to the actual cost when the job ends (jobs.ledger)."""
    req = parse_request(body)
    entry, inp, units = check_job(services, req.model, req.input, caller)
    webhook = check_webhook(services, req.webhook, caller)

    def create(remember: idempotency.Remember) -> Job:
        check_available(services, entry.id)
        quote = services.estimator.quote(entry, units)
        now = services.now()
        row = job_row(
            entry,
            inp,
            units,
            quote,
            caller=caller,
            priority=req.priority,
            metadata=req.metadata,
            webhook=webhook,
            now=now,
        )
        with services.sessions.begin() as session:
            # The job's row first (on SQLite it takes the write lock), the wallet last: on
            # PostgreSQL the caller's wallet row stays locked from its reservation to the
            # commit, so as little as possible comes after it.
            session.execute(_INSERT_JOB, _columns(row))
            remember(session, row["id"])
            if not caller.admin:  # metered
                ledger.reserve(
                    session, caller.id, services.allowances.for_tier(caller.tier), row["id"], quote.tokens, now
                )
            try:
                publish(services.celery, row["id"], entry.id, req.priority)
            except Exception as exc:  # kombu raises many types; all mean "not enqueued"
                raise ServiceUnavailable(f"broker unreachable, job not accepted: {exc.__class__.__name__}") from exc
        return Job(**row)

    return idempotency.once(services, caller.id, idempotency_key, body, create, idempotency.row_of(services, Job))


def job_row(
    entry: ModelEntry,
    inp: dict[str, Any],
    units: float,
    quote: Quote,
    *,
    caller: Caller,
    priority: Priority,
    metadata: dict[str, Any],
    webhook: dict[str, Any] | None,
    now: datetime,
    batch_id: str | None = None,
    custom_id: str | None = None,
) -> dict[str, Any]:
    """A new queued job's row (``Job(**row)``, or one of many rows of a bulk insert): its
    checked input, its price, and the tokens it reserves (none for the operator's own
    key, which is not metered)."""
    return {
        "id": new_id("job"),
        "model": entry.id,
        "kind": entry.kind,
        "status": QUEUED,
        "priority": priority,
        "input": inp,
        "meta": metadata,
        "progress": 0.0,
        "created_at": now,
        "attempts": 0,
        "gpu_seconds": 0.0,
        "tokens_reserved": 0 if caller.admin else quote.tokens,
        "tokens_charged": 0,
        "work_units": units,
        "price_rate": quote.rate,
        "min_tokens": quote.min_tokens,
        "usage_detail": {},
        "caller": caller.id,
        "saved": False,
        "webhook": webhook,
        "batch_id": batch_id,
        "custom_id": custom_id,
    }


_INSERT_JOB = insert(cast("Table", Job.__table__))
"""One job row through the Core: a submit's insert costs a fraction of the ORM's unit of work."""


def _columns(row: dict[str, Any]) -> dict[str, Any]:
    """A ``job_row`` keyed by column names (``meta`` is the ``metadata`` column)."""
    out = dict(row)
    out["metadata"] = out.pop("meta")
    return out


def check_job(
    services: Services, model_id: str, raw_input: Any, caller: Caller
) -> tuple[ModelEntry, dict[str, Any], float]:
    """Check one job's model and input against the catalog (422 naming the field);
    return ``(entry, input with defaults filled in, work units)``. A ``seed`` left out is
    chosen now, so the result is reproducible."""
    entry = services.catalog.get(model_id)
    if entry is None:
        raise InputError(
            f"unknown model {model_id!r}; GET /v1/models lists the models",
            [{"loc": ["model"], "msg": f"unknown model {model_id!r}"}],
            code="unknown_model",
        )
    inp = entry.validate_input(raw_input)
    check_worker_accepts(entry, inp)
    prompt_tokens = audio_seconds = None
    if entry.kind == "speech":
        from .files import check_audio_input  # PyAV, imported only for speech jobs

        audio_seconds = check_audio_input(services, entry, inp, owner=caller)
    if entry.kind == "text":
        from .prompts import check_context

        prompt_tokens = check_context(entry, inp)
    if "seed" in inp and inp["seed"] is None:
        inp["seed"] = secrets.randbelow(SEED_MAX + 1)
    return entry, inp, work_units(entry.kind, inp, prompt_tokens=prompt_tokens, audio_seconds=audio_seconds)


def check_worker_accepts(entry: ModelEntry, inp: dict[str, Any]) -> None:
    """Refuse (422 naming the field) input the catalog's schema lets through but the
    model's backend would fail on, once the job had waited its turn on a GPU."""
    errors = []
    if entry.kind == "text":
        for i, stop in enumerate(inp.get("stop") or ()):
            if not stop:
                errors.append(
                    {
                        "loc": ["input", "stop", i],
                        "msg": "must not be empty (an empty stop string would end every generation at once)",
                    }
                )
    if entry.kind == "speech":
        language = inp.get("language")
        if language is not None and language not in WHISPER_LANGUAGES:
            errors.append(
                {
                    "loc": ["input", "language"],
                    "msg": f"unknown language {language!r}: a Whisper language code in lower case "
                    f"(en, de, fr, ja, zh, … {len(WHISPER_LANGUAGES)} codes), or leave it out to "
                    "have it detected",
                }
            )
    if errors:
        raise InputError(f"input is not valid for model {entry.id!r}", errors)


def check_webhook(services: Services, raw: Any, caller: Caller, *, batch: bool = False) -> dict[str, Any] | None:
    """A job's (or batch's) ``webhook``, checked (jobs.webhooks.spec.parse_spec); None when
    not given. Webhooks need an account: they are signed with its secret."""
    if raw is None:
        return None
    if not caller.keyed:
        raise InputError(
            "webhooks need an API key: they are signed with the account's secret",
            [{"loc": ["webhook"], "msg": "needs an API key (Authorization: Bearer …)"}],
        )
    from .webhooks.spec import parse_spec

    return parse_spec(raw, services.settings.webhook_allow_hosts, batch=batch)


def check_available(services: Services, model_id: str) -> None:
    """Refuse (503 ``model_unavailable``) a job for a model no live worker serves."""
    try:
        served = services.served.get()
    except Exception as exc:  # Redis is the broker too: nothing could be enqueued anyway
        raise ServiceUnavailable(f"broker unreachable, job not accepted: {exc.__class__.__name__}") from exc
    if model_id not in served:
        raise ModelUnavailable(
            f"no live worker serves model {model_id!r} (none started, or the planner found no card "
            f"it fits: see `vramq plan`); the job was not queued"
        )
