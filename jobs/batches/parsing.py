"""A batch request read and checked: its fields, and every line checked as a job would be."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..accounts import Caller
from ..errors import InputError, NotFound, ServiceUnavailable, validation_errors
from ..priorities import Priority
from ..submit import Metadata, check_job

if TYPE_CHECKING:
    from ..services import Services

MAX_JOBS = 10_000
MAX_ERRORS_LISTED = 100
"""A rejected batch lists this many bad lines at most (and says how many there were)."""


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
    priority: Priority = "low"
    metadata: Metadata = Field(default_factory=dict)
    webhook: dict[str, Any] | None = None


def _invalid(errors: list[dict[str, Any]], message: str = "the batch is invalid") -> InputError:
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
        for error, e in zip(errors, exc.errors(), strict=True):
            if e["type"] == "too_long" and error["loc"] == ["jobs"]:
                error["msg"] = f"a batch holds at most {MAX_JOBS} jobs"
        raise _invalid(errors) from None
    if (req.jobs is None) == (req.input_file is None):
        raise _invalid(
            [{"loc": ["jobs"], "msg": "give either jobs (a list) or input_file (a JSONL file id), not both"}]
        )
    if req.jobs is not None and len(req.jobs) > max_jobs:
        raise _invalid([{"loc": ["jobs"], "msg": f"a batch holds at most {max_jobs} jobs{limit_note}"}])
    return req


def file_lines(
    services: Services, file_id: str, caller: Caller, max_jobs: int = MAX_JOBS, limit_note: str = ""
) -> list[tuple[int, Any]]:
    """The JSONL file's lines as ``(line number, parsed value)``, blank lines skipped;
    counted before they are parsed, parsed strictly (jobs.strictjson)."""
    from .. import strictjson
    from ..files import get_file

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


def check_lines(services: Services, lines: list[tuple[int, Any]], caller: Caller, where: str) -> list[dict[str, Any]]:
    """Check every line as a job; return the jobs' fields, or raise 422 listing the bad
    lines (``loc`` is ``[where, index, field…]``, ``line`` the 1-based line number)."""
    errors: list[dict[str, Any]] = []
    checked: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    bad_lines: list[int] = []
    for index, (number, raw) in enumerate(lines):
        base: list[str | int] = [where, index] if where == "jobs" else [where, "line", number]
        line_errors = []
        if not isinstance(raw, dict):
            line_errors.append({"loc": base, "msg": "must be a JSON object"})
        else:
            try:
                line = BatchLine.model_validate(raw)
                entry, inp, units = check_job(services, line.model, line.input, caller)
                if line.custom_id in seen:
                    raise InputError(
                        "",
                        [
                            {
                                "loc": ["custom_id"],
                                "msg": f"custom_id {line.custom_id!r} is also on line {seen[line.custom_id]}",
                            }
                        ],
                    )
                seen[line.custom_id] = number
                checked.append({"line": line, "entry": entry, "input": inp, "units": units})
            except ValidationError as exc:
                line_errors += validation_errors(exc, base)
            except InputError as exc:
                line_errors += [{**e, "loc": base + list(e["loc"])} for e in exc.errors] or [
                    {"loc": base, "msg": str(exc)}
                ]
        if line_errors:
            bad_lines.append(number)
            for e in line_errors:
                if len(errors) < MAX_ERRORS_LISTED:
                    errors.append({**e, "line": number})
    if bad_lines:
        more = f"; the first {MAX_ERRORS_LISTED} errors are listed" if len(errors) >= MAX_ERRORS_LISTED else ""
        raise _invalid(
            errors,
            f"{len(bad_lines)} of {len(lines)} lines are invalid (lines "
            f"{', '.join(map(str, bad_lines[:10]))}{', …' if len(bad_lines) > 10 else ''})"
            f"; nothing was queued{more}",
        )
    return checked
