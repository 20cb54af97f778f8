"""RFC 9457 problem+json responses, and the handlers that turn every error into one."""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from vramq.jobs.errors import (
    Conflict,
    Forbidden,
    InputError,
    NotFound,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    VramqError,
)

log = logging.getLogger("vramq.api")

STATUS = {
    InputError: 422,
    NotFound: 404,
    Conflict: 409,
    ServiceUnavailable: 503,
    Unauthorized: 401,
    Forbidden: 403,
    QuotaExceeded: 402,
    RateLimited: 429,
}
TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    402: "Payment required",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    408: "Request timeout",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Invalid input",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}
HTTP_CODES = {
    400: "invalid_input",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}


def problem(
    status: int, detail: str, code: str | None = None, errors: list | None = None, headers: dict | None = None, **extra
):
    body = {
        "type": f"https://vramq.dev/problems/{code or HTTP_CODES.get(status, 'error')}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code or HTTP_CODES.get(status, "error"),
        **extra,
    }
    if errors is not None:
        body["errors"] = errors
    resp = jsonify(body)
    resp.status_code = status
    resp.mimetype = "application/problem+json"
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _status_for(exc: VramqError) -> int:
    if exc.code == "payload_too_large":  # an input too large in bytes, e.g. a data: URI
        return 413
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return getattr(exc, "status", 500)


def install(app: Flask) -> None:
    @app.errorhandler(VramqError)
    def _vramq(exc: VramqError):
        status = _status_for(exc)
        if status >= 500 and not isinstance(exc, ServiceUnavailable):
            log.exception("error serving request")
        errors = getattr(exc, "errors", None)
        retry = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(retry)} if retry else {}
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="vramq"'
        return problem(
            status, str(exc), exc.code, errors if errors else None, headers=headers, **getattr(exc, "extra", {})
        )

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        detail = exc.description or exc.name
        if exc.code == 413:
            from .guards import too_large

            return too_large()
        headers = {}
        valid_methods = getattr(exc, "valid_methods", None) if exc.code == 405 else None  # MethodNotAllowed's
        if valid_methods:
            allowed = sorted(set(valid_methods) | {"OPTIONS"})
            headers["Allow"] = ", ".join(allowed)
            detail = f"{request.method} is not allowed on {request.path}; allowed: {', '.join(allowed)}"
        return problem(exc.code or 500, detail, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error serving request")
        return problem(500, "internal error; the server logged the details")
