"""A job's or batch's ``webhook`` field: its schema, its events, and the check at submit."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InputError, validation_errors
from .urls import check_url

JOB_EVENTS = ("job.succeeded", "job.failed", "job.canceled")
BATCH_EVENTS = ("batch.completed",)


class WebhookSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)
    events: list[Literal["job.succeeded", "job.failed", "job.canceled", "batch.completed"]] | None = Field(
        default=None, min_length=1
    )


def parse_spec(raw: Any, allow: tuple[str, ...], *, batch: bool = False) -> dict[str, Any]:
    """A job's (or, with ``batch``, a batch's) ``webhook``, checked: ``{"url", "events"}``.

    A job's events default to all three job events. A batch's default to
    ``batch.completed``; job events named on a batch are sent for each of its jobs."""
    from pydantic import ValidationError

    try:
        spec = WebhookSpec.model_validate(raw)
    except ValidationError as exc:
        raise InputError("webhook is invalid", validation_errors(exc, ["webhook"])) from None
    allowed = JOB_EVENTS + BATCH_EVENTS if batch else JOB_EVENTS
    for i, event in enumerate(spec.events or ()):
        if event not in allowed:
            msg = f"{event!r} is not an event of a {'batch' if batch else 'job'}; one of {', '.join(allowed)}"
            raise InputError(f"webhook is invalid: {msg}", [{"loc": ["webhook", "events", str(i)], "msg": msg}])
    check_url(spec.url, allow)
    events = spec.events or (BATCH_EVENTS if batch else JOB_EVENTS)
    return {"url": spec.url, "events": sorted(set(events))}
