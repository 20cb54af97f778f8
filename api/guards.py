"""What every request must pass before a view runs, and the one way bodies are read.

In the order ``api.app`` applies them:

1. **Host.** Links (``Location``, share links, signed local-store links, batch manifests)
   are built from ``VRAMQ_PUBLIC_URL``, else from the request's ``Host``. A Host that is
   not the operator's would put the operator's links on someone else's domain, so only
   the hosts of ``Settings.allowed_hosts`` are answered (400 ``host_not_allowed``).
2. **Path and query.** No NUL character in the path, a query parameter or a header the
   API stores (PostgreSQL text refuses NUL: it would be a 500).
3. *(the caller is resolved and rate limited: api.callers, api.ratelimit)*
4. **Content type.** A body sent to a JSON endpoint must say it is JSON
   (``application/json`` or ``application/*+json``), else 415. A web page can make a
   visitor's browser POST ``text/plain``, a form or no type at all to any site without
   asking first; ``application/json`` needs a CORS preflight, which this API never grants.
   So no page can spend a visitor's allowance or make accounts from their address.
5. **Size.** The limit depends on the endpoint and on who asks (``body_limit``); a
   ``Content-Length`` past it is 413 before a byte is read, and a chunked body is cut
   off at it (413 too).

``json_body`` then reads and parses strictly (jobs.strictjson).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from flask import current_app, g, request
from werkzeug.exceptions import BadRequest, HTTPException, RequestTimeout

from vramq.jobs import strictjson
from vramq.jobs.accounts import Caller
from vramq.jobs.errors import InputError

from .problems import problem

#: Endpoints whose request body is JSON (and needed): their Content-Type must say so
#: even when the body is empty.
JSON_BODY_ENDPOINTS = frozenset(
    {"jobs.create_job", "jobs.estimate", "batches.create_batch", "accounts.create", "accounts.credit"}
)
#: Endpoints that take a multipart upload: they check its type themselves, and their body
#: may be as large as an upload (``VRAMQ_MAX_UPLOAD_MB``).
UPLOAD_ENDPOINTS = frozenset(
    {"files.upload_file", "openai.create_file", "openai.create_transcription", "openai.create_translation"}
)
#: Methods that may carry a body.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Headers the API reads and stores or passes on.
CHECKED_HEADERS = ("Idempotency-Key", "Last-Event-ID")
#: Multipart boundaries, part headers and the ``purpose`` field on top of an uploaded file.
MULTIPART_SLACK = 64 * 1024

_PORT = re.compile(r"[0-9]{1,5}")


# --- 1. Host ------------------------------------------------------------------------------


def hostname(host: str) -> str | None:
    """The name in a ``Host`` value (``name``, ``name:port``, ``[v6]:port``), lower case;
    None if it is not one."""
    if not host:
        return None
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1 :] if end > 0 else None
        if rest is None or (rest and not (rest.startswith(":") and _PORT.fullmatch(rest[1:]))):
            return None
        return host[1:end].lower()
    name, sep, port = host.rpartition(":") if ":" in host else (host, "", "")
    if sep and not _PORT.fullmatch(port):
        return None
    name = name.lower().rstrip(".")
    return name or None


def host_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    """Is ``name`` (from ``hostname``) one of ``allowed``: an exact name, ``*.suffix``, an
    IP address, a network (CIDR), or ``*`` for any."""
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    for entry in allowed:
        if entry == "*" or entry == name:
            return True
        if entry.startswith("*.") and name.endswith(entry[1:]) and len(name) > len(entry) - 1:
            return True
        if ip is not None:
            try:
                if "/" in entry and ip in ipaddress.ip_network(entry, strict=False):
                    return True
                if "/" not in entry and ip == ipaddress.ip_address(entry.strip("[]")):
                    return True
            except ValueError:
                continue
    return False


def check_host(allowed: tuple[str, ...]):
    """400 problem for a Host this server does not answer to; None if it does."""
    raw = request.headers.get("Host", "")
    name = hostname(request.host)
    if name is not None and host_allowed(name, allowed):
        return None
    shown = raw[:100].encode("ascii", "backslashreplace").decode()
    msg = (
        f"this server does not answer to Host {shown!r}; its operator lists the names it answers to in "
        "VRAMQ_ALLOWED_HOSTS (or sets VRAMQ_PUBLIC_URL)"
    )
    return problem(400, msg, "host_not_allowed", [{"loc": ["header", "Host"], "msg": msg}])


# --- 2. path, query and stored headers ----------------------------------------------------


def check_path_and_query() -> None:
    """422 naming the place of a NUL character in the path, the query or a stored header."""
    nul = "not accepted: contains a NUL character (%00)"
    if "\x00" in request.path:
        raise InputError(f"path: {nul}", [{"loc": ["path"], "msg": nul}])
    for name, value in request.args.items(multi=True):
        if "\x00" in name or "\x00" in value:
            shown = name.replace("\x00", "\\u0000")
            raise InputError(f"query parameter {shown}: {nul}", [{"loc": ["query", shown], "msg": nul}])
    for header in CHECKED_HEADERS:
        stored = request.headers.get(header)
        if stored is not None and "\x00" in stored:
            raise InputError(f"header {header}: {nul}", [{"loc": ["header", header], "msg": nul}])


# --- 4. content type ----------------------------------------------------------------------


def is_json_type(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def has_body() -> bool:
    return bool(request.content_length) or bool(request.headers.get("Transfer-Encoding"))


def check_content_type(endpoint: str | None):
    """415 problem for a body that does not say it is JSON, on an endpoint that reads
    JSON (or takes no body at all); None if fine. Uploads check their own."""
    if request.method not in BODY_METHODS or endpoint is None or endpoint in UPLOAD_ENDPOINTS:
        return None
    if endpoint not in JSON_BODY_ENDPOINTS and not has_body():
        return None  # e.g. POST …/cancel with no body
    if is_json_type(request.mimetype):
        return None
    given = request.headers.get("Content-Type")
    shown = "no Content-Type" if not given else f"Content-Type {given[:100]!r}"
    msg = "must be application/json (or application/*+json)"
    return problem(
        415,
        f"{request.method} {request.path} takes a JSON body; got {shown}",
        "unsupported_media_type",
        [{"loc": ["header", "Content-Type"], "msg": msg}],
    )


# --- 5. size ------------------------------------------------------------------------------


def body_limit(endpoint: str | None, caller: Caller, settings) -> tuple[int, int, str, str]:
    """``(bytes that may be read, the limit as stated, its setting, a note)`` for this
    endpoint and caller. Uploads have their own limit; a batch from a caller with an API
    key may be as large as ``VRAMQ_MAX_BATCH_BODY_MB``; everything else, anonymous
    batches included, ``VRAMQ_MAX_BODY_KB``."""
    if endpoint in UPLOAD_ENDPOINTS:
        return settings.max_upload_bytes + MULTIPART_SLACK, settings.max_upload_bytes, "VRAMQ_MAX_UPLOAD_MB", ""
    if endpoint == "batches.create_batch":
        if caller.keyed or caller.admin:
            limit = max(settings.max_batch_body_bytes, settings.max_body_bytes)
            return limit, limit, "VRAMQ_MAX_BATCH_BODY_MB", ""
        return (
            settings.max_body_bytes,
            settings.max_body_bytes,
            "VRAMQ_MAX_BODY_KB",
            f"; with an API key a batch may be up to {settings.max_batch_body_bytes} bytes (VRAMQ_MAX_BATCH_BODY_MB)",
        )
    return settings.max_body_bytes, settings.max_body_bytes, "VRAMQ_MAX_BODY_KB", ""


def apply_body_limit(endpoint: str | None, caller: Caller, settings):
    """Set this request's read limit; 413 problem if its ``Content-Length`` is past it
    (nothing of the body is read), else None."""
    cap, limit, setting, note = body_limit(endpoint, caller, settings)
    request.max_content_length = cap
    g.body_limit = (limit, setting, note)
    length = request.content_length
    if length is not None and length > cap:
        return too_large(length)
    return None


def too_large(length: int | None = None):
    """The 413 problem for this request's body (``length`` bytes, when known)."""
    limit, setting, note = g.get("body_limit") or (
        current_app.config.get("MAX_CONTENT_LENGTH"),
        "VRAMQ_MAX_BODY_KB",
        "",
    )
    size = f" ({length} bytes)" if length is not None else ""
    what = "the upload" if setting == "VRAMQ_MAX_UPLOAD_MB" else "the request body"
    detail = f"{what}{size} exceeds the limit of {limit} bytes ({setting}){note}"
    return problem(
        413,
        detail,
        "payload_too_large",
        [{"loc": ["body"], "msg": f"at most {limit} bytes ({setting})"}],
        limit_bytes=limit,
    )


# --- reading ------------------------------------------------------------------------------


def read_body() -> bytes:
    """The body, never more than this request's limit (413 past it, chunked too); 400 for
    a body the server cannot read (a malformed chunk, a client gone mid-body)."""
    try:
        raw = request.get_data(cache=False)
        limit = request.max_content_length
        if limit is not None and len(raw) >= limit:
            # werkzeug stops a streamed (chunked) body at the limit without complaint;
            # one more read tells a body of exactly the limit from a longer one (413).
            request.stream.read(1)
    except HTTPException as exc:
        # werkzeug answers a read that failed as ClientDisconnected (400); when it failed
        # because the client sent too slowly (api.server.RequestReadTimeout), that is 408.
        if getattr(exc.__context__, "http_status", None) == 408:
            raise RequestTimeout(f"the request body did not arrive in time: {exc.__context__}") from None
        raise
    except Exception as exc:  # gunicorn's InvalidChunkSize, NoMoreData, … : the client's fault
        if getattr(exc, "http_status", None) == 408:
            raise RequestTimeout(f"the request body did not arrive in time: {exc}") from None
        raise BadRequest(f"the request body could not be read: {exc.__class__.__name__}: {exc}"[:500]) from None
    return raw


def json_body(*, empty: Any = ..., syntax_status: int = 400) -> Any:
    """The body as strict JSON (jobs.strictjson: 422 naming the place of a NaN, a NUL, a
    lone surrogate, nesting too deep). ``empty``: what an empty body stands for (else it
    is malformed). Malformed JSON is 400 (``syntax_status``: 422 where the API has
    always said so)."""
    raw = read_body()
    if empty is not ... and not raw.strip():
        return empty
    try:
        return strictjson.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        msg = f"the body is not valid JSON: {exc}"
        if syntax_status == 400:
            raise BadRequest(msg) from None
        raise InputError(msg, [{"loc": [], "msg": "not valid JSON"}]) from None
