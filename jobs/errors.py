"""The exceptions vramq raises, one root and a shallow tree.

VramqError                     root: every error vramq raises on purpose
├── ConfigError                a setting or the catalog is wrong (found at start-up)
├── InputError                 a request's input is invalid (422, names the field)
├── Unauthorized               no valid API key where one is needed (401)
├── Forbidden                  the key is valid but may not do this (403)
├── NotFound                   no such resource for this caller (404)
├── Conflict                   the resource is in a state that forbids the call (409)
├── QuotaExceeded              not enough tokens for the job (402, with resets_at)
├── RateLimited                too many requests this minute (429, Retry-After)
├── ServiceUnavailable         a dependency (broker, database, store) cannot be reached (503)
│   └── ModelUnavailable       no live worker serves the model (503, not queued forever)
├── MissingExtra               an optional dependency is not installed (names the extra)
└── JobError                   a job failed on the worker; carries a stable ``code``
    ├── JobCanceled            the job was canceled while it ran
    ├── OutOfMemory            the device ran out of memory for this job
    └── ModelLoadFailed        the worker could not load the job's model
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


def validation_errors(exc: ValidationError, prefix: Sequence[str | int] = ()) -> list[dict[str, Any]]:
    """A pydantic ``ValidationError`` as the ``errors`` of an ``InputError``:
    ``{"loc": [*prefix, field…], "msg"}`` each."""
    return [{"loc": [*prefix, *map(str, e["loc"])], "msg": e["msg"]} for e in exc.errors()]


class VramqError(Exception):
    """Root of every error vramq raises on purpose."""

    code = "internal_error"


class ConfigError(VramqError):
    """A setting or the model catalog is invalid."""

    code = "config_error"


class InputError(VramqError):
    """A request's input is invalid; ``errors`` lists ``{"loc", "msg"}`` items."""

    code = "invalid_input"

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None, code: str | None = None):
        super().__init__(message)
        self.errors = errors or []
        if code:
            self.code = code


class Unauthorized(VramqError):
    """The call needs a valid API key (none was given, or the one given is unknown)."""

    code = "unauthorized"


class Forbidden(VramqError):
    """The caller is known but may not make this call (an admin call without the admin key)."""

    code = "forbidden"


class QuotaExceeded(VramqError):
    """The caller's tokens (today's allowance plus purchased balance) do not cover the job."""

    code = "quota_exceeded"

    def __init__(self, message: str, *, needed: int, available: int, resets_at: str):
        super().__init__(message)
        self.extra = {
            "tokens_needed": needed,
            "tokens_available": available,
            "shortfall": needed - available,
            "resets_at": resets_at,
        }


class RateLimited(VramqError):
    """Too many requests in the current minute for this key or address."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = max(1, retry_after)


class NotFound(VramqError):
    """The resource does not exist for this caller."""

    code = "not_found"


class Conflict(VramqError):
    """The resource's state forbids the call (for example canceling a finished job)."""

    code = "conflict"


class ServiceUnavailable(VramqError):
    """A dependency (broker, database, object store) cannot be reached."""

    code = "service_unavailable"
    retry_after: int | None = None
    """Seconds a client should wait before trying again (``Retry-After``), when known."""


class ModelUnavailable(ServiceUnavailable):
    """No live worker serves the model: a job for it would wait in the queue forever."""

    code = "model_unavailable"
    retry_after = 10


class MissingExtra(VramqError):
    """An optional dependency is missing; the message names the extra to install."""

    code = "missing_extra"

    def __init__(self, module: str, extra: str):
        super().__init__(f"{module} is not installed: pip install 'vramq[{extra}]'")
        self.module = module
        self.extra = extra


class JobError(VramqError):
    """A job failed while it ran; ``code`` is stable and shown to the user."""

    code = "job_failed"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code:
            self.code = code


class JobCanceled(JobError):
    """The job was canceled while it ran."""

    code = "canceled"


class OutOfMemory(JobError):
    """The device ran out of memory for this job."""

    code = "out_of_memory"


class ModelLoadFailed(JobError):
    """The worker could not load the job's model (bad weights, a missing file, no memory)."""

    code = "model_load_failed"
