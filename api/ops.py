"""Operations endpoints: liveness, readiness, metrics, the OpenAPI document, object downloads."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request, send_file

from vramq.jobs.db import ping as ping_db
from vramq.jobs.errors import NotFound

from . import metrics
from .openapi import spec
from .problems import problem

bp = Blueprint("ops", __name__)


def _services():
    return current_app.config["VRAMQ"]


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    """Ready when the database, the broker and the object store all answer."""
    services = _services()
    checks = {}
    for name, check in (
        ("database", lambda: ping_db(services.engine)),
        ("broker", services.redis.ping),
        ("storage", services.store.ping),
    ):
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:  # any failure means not ready; say which and why
            checks[name] = f"unavailable: {exc.__class__.__name__}: {exc}"[:300]
    ready = all(v == "ok" for v in checks.values())
    return {"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503


@bp.get("/metrics")
def prometheus():
    return Response(metrics.exposition(_services()), mimetype="text/plain; version=0.0.4")


@bp.get("/openapi.json")
def openapi():
    return spec(_services())


@bp.get("/v1/blobs/<path:key>")
def blob(key: str):
    """Serve an object of the local store through its signed link (403 if tampered or expired)."""
    from vramq.storage.local import LinkRefused, LocalStore

    store = _services().store
    if not isinstance(store, LocalStore):
        raise NotFound("objects are served by the object store's own links")
    try:
        store.verify(key, request.args.get("expires", ""), request.args.get("sig", ""))
    except LinkRefused as exc:
        return problem(403, f"link refused: {exc}", "forbidden")
    try:
        path, content_type = store.open(key)
    except (NotFound, FileNotFoundError):
        raise NotFound("object not found (it may have expired)") from None
    return send_file(path, mimetype=content_type, max_age=0)
