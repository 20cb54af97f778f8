"""``/v1/models``: the catalog, with what is queued for each model."""

from __future__ import annotations

from flask import Blueprint, current_app
from sqlalchemy import func, select

from vramq.jobs.errors import NotFound
from vramq.jobs.heartbeat import WorkerBeat, live_workers, served_by
from vramq.jobs.lifecycle import QUEUED
from vramq.jobs.pricing import rate_for, vram_need_bytes
from vramq.jobs.schema import Job

bp = Blueprint("models", __name__)


def _depths(services) -> dict[str, int]:
    with services.sessions() as session:
        rows = session.execute(select(Job.model, func.count()).where(Job.status == QUEUED).group_by(Job.model))
        return dict(rows.all())


def _workers(services) -> list[WorkerBeat]:
    try:
        return live_workers(services.redis)
    except Exception:  # broker down: nothing can be known to be served
        return []


def _model(services, entry, depth: int, workers: list[WorkerBeat]) -> dict:
    """The entry, with ``available`` (a live worker serves it) and ``vram_gb`` (the
    planner's estimate incl. headroom: from a worker's heartbeat, else estimated here)."""
    need = next((w["need_bytes"][entry.id] for w in workers if entry.id in (w.get("need_bytes") or {})), None)
    if need is None:
        need = vram_need_bytes(entry)
    price = {"tokens_per_gpu_second": rate_for(entry), "min_tokens": entry.price.min_tokens}
    return {
        **entry.public(),
        "object": "model",
        "price": price,
        "vram_gb": None if need is None else round(need / 1e9, 3),
        "available": entry.id in served_by(workers),
        "queue_depth": depth,
    }


@bp.get("/v1/models")
def list_models():
    services = current_app.config["VRAMQ"]
    depths, workers = _depths(services), _workers(services)
    return {"object": "list", "data": [_model(services, e, depths.get(e.id, 0), workers) for e in services.catalog]}


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
    return _model(services, entry, _depths(services).get(entry.id, 0), _workers(services))
