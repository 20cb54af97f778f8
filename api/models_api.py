"""``/v1/models``: the catalog, with what is queued for each model."""

from __future__ import annotations

from flask import Blueprint, current_app
from sqlalchemy import func, select

from jobs.errors import NotFound
from jobs.heartbeat import live_workers
from jobs.lifecycle import QUEUED
from jobs.schema import Job

bp = Blueprint("models", __name__)


def _depths(services) -> dict[str, int]:
    with services.sessions() as session:
        rows = session.execute(select(Job.model, func.count()).where(Job.status == QUEUED).group_by(Job.model))
        return dict(rows.all())


def _served(services) -> set[str]:
    """Models that at least one live, ready worker holds resident."""
    try:
        workers = live_workers(services.redis)
    except Exception:  # broker down: nothing can be known to be served
        return set()
    return {m for w in workers if w.get("state") == "ready" for m in w.get("models", [])}


def _model(entry, depth: int, served: set[str]) -> dict:
    # ``vram_gb`` comes from the VRAM planner (placement work); null until then.
    return {**entry.public(), "object": "model", "vram_gb": None, "available": entry.id in served, "queue_depth": depth}


@bp.get("/v1/models")
def list_models():
    services = current_app.config["VRAMQ"]
    depths, served = _depths(services), _served(services)
    return {"object": "list", "data": [_model(e, depths.get(e.id, 0), served) for e in services.catalog]}


@bp.get("/v1/workers")
def list_workers():
    """Live workers, from their heartbeats: card, models, state, jobs running."""
    services = current_app.config["VRAMQ"]
    return {"object": "list", "data": sorted(live_workers(services.redis), key=lambda w: w["name"])}


@bp.get("/v1/models/<model_id>")
def get_model(model_id: str):
    services = current_app.config["VRAMQ"]
    entry = services.catalog.get(model_id)
    if entry is None:
        raise NotFound(f"no model {model_id!r}")
    return _model(entry, _depths(services).get(entry.id, 0), _served(services))
