"""Errors under ``/openai/v1`` in OpenAI's shape: ``{"error": {"message", "type",
"param", "code"}}``, with the status codes the ``openai`` SDKs map to their exceptions.

The views raise vramq's own errors (``vramq.jobs.errors``); the app turns them into
problem+json as everywhere (``api.problems``), and ``to_openai`` rewrites every such
response of a request under ``/openai/v1`` on its way out, so errors raised before the
view (a wrong key, a rate limit, a body too large) are in this shape too. What changes:

- 422 (invalid input) is 400, as OpenAI answers; an unknown model is 404 ``model_not_found``;
- 402 (the caller's tokens do not cover the job) is 429 ``insufficient_quota``, as OpenAI
  answers when an account's credit is spent;
- 415 is 400; every other status stays, ``Retry-After`` and ``WWW-Authenticate`` included.

``param`` names the field as the OpenAI request spells it (``max_tokens``,
``messages[0].role``, ``size`` for a bad width or height, ``n`` for ``num_images``);
``message`` keeps vramq's words, the limit and its setting included.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Response, request

from . import PREFIX, bp

#: vramq's input fields that an OpenAI request names otherwise.
PARAM_NAMES = {"width": "size", "height": "size", "num_images": "n", "audio": "file"}

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}

MAX_DETAILS = 3
"""A message quotes at most this many of the problem's field errors."""


def param_of(loc: list[Any]) -> str | None:
    """A problem's ``loc`` as the OpenAI request names the field; None for a header or the body."""
    parts = list(loc)
    if not parts or parts[0] in ("header", "body"):
        return None
    if parts[0] in ("input", "query"):
        parts = parts[1:]
    if not parts:
        return None
    out = PARAM_NAMES.get(str(parts[0]), str(parts[0]))
    for p in parts[1:]:
        out += f"[{p}]" if isinstance(p, int) or str(p).isdigit() else f".{p}"
    return out


def openai_error(status: int, message: str, *, code: str | None, param: str | None = None, kind: str | None = None):
    """The body of an OpenAI error answered with ``status``."""
    return {
        "error": {"message": message, "type": kind or TYPES.get(status, "server_error"), "param": param, "code": code}
    }


def from_problem(status: int, problem: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The OpenAI status and body for a vramq problem."""
    code = problem.get("code")
    errors = problem.get("errors") or []
    message = str(problem.get("detail") or problem.get("title") or "error")
    param = next((p for p in (param_of(e.get("loc") or []) for e in errors) if p), None)
    details = []
    for e in errors[:MAX_DETAILS]:
        where = param_of(e.get("loc") or [])
        text = f"{where}: {e.get('msg')}" if where else str(e.get("msg"))
        if str(e.get("msg")) not in message:
            details.append(text)
    if details:
        message += " (" + "; ".join(details) + (" …" if len(errors) > MAX_DETAILS else "") + ")"
    kind = None
    if status == 422 or status == 415:
        status = 400
    if code == "unknown_model":
        status, code, param = 404, "model_not_found", "model"
    elif status == 402:
        status, kind, code = 429, "insufficient_quota", "insufficient_quota"
    return status, openai_error(status, message, code=code, param=param, kind=kind)


@bp.after_app_request
def to_openai(resp: Response) -> Response:
    """Rewrite a problem+json response to a request under ``/openai/v1`` in OpenAI's shape."""
    if resp.mimetype != "application/problem+json" or not request.path.startswith(PREFIX + "/"):
        return resp
    try:
        problem = json.loads(resp.get_data())
    except ValueError:
        problem = {"detail": "error"}
    status, body = from_problem(resp.status_code, problem if isinstance(problem, dict) else {})
    resp.set_data(json.dumps(body))
    resp.status_code = status
    resp.mimetype = "application/json"
    return resp
