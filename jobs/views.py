"""Jobs as JSON, the same for the HTTP API and webhook payloads: signed links minted at
read time, times in ISO 8601 UTC. No Flask here: the caller says where links point."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import urljoin

from .ports import ObjectStore
from .schema import Job


def iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat().replace("+00:00", "Z")


class Links:
    """Mints the URLs in a job's JSON: signed object links, and the API's own."""

    def __init__(self, store: ObjectStore, link_ttl: int, base: str):
        self.store, self.link_ttl, self.base = store, link_ttl, base.rstrip("/") + "/"

    def signed(self, key: str) -> str:
        url = self.store.signed_url(key, self.link_ttl)
        return url if "://" in url else urljoin(self.base, url.lstrip("/"))

    def output(self, value: Any) -> Any:
        """Replace every ``{"$object": key}`` with a signed link to that object."""
        if isinstance(value, dict):
            if set(value) == {"$object"}:
                return self.signed(value["$object"])
            return {k: self.output(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.output(v) for v in value]
        return value


def job_json(
    job: Job, links: Links, queue: Callable[[Job], tuple[int | None, float | None]] = lambda job: (None, None)
) -> dict[str, Any]:
    """The job's JSON; ``queue(job)`` gives ``(queue_position, eta_seconds)`` while it is queued."""
    position, eta = queue(job)
    self_url = urljoin(links.base, f"v1/jobs/{job.id}")
    error = {"code": job.error_code, "message": job.error_message} if job.error_code else None
    return {
        "id": job.id,
        "object": "job",
        "model": job.model,
        "kind": job.kind,
        "status": job.status,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "progress": round(job.progress, 4),
        "queue_position": position,
        "eta_seconds": eta,
        "input": job.input,
        "metadata": job.meta,
        "batch_id": job.batch_id,
        "custom_id": job.custom_id,
        "priority": job.priority,
        "output": None if job.output is None or job.outputs_expired_at else links.output(job.output),
        "error": error,
        "attempts": job.attempts,
        "usage": {
            "gpu_seconds": round(job.gpu_seconds, 6),
            "tokens_reserved": job.tokens_reserved,
            "tokens_charged": job.tokens_charged,
            **job.usage_detail,
        },
        "saved": job.saved,
        "expires_at": None if job.saved else iso(job.expires_at),
        "outputs_expired": job.outputs_expired_at is not None,
        "links": {"self": self_url, "cancel": self_url + "/cancel", "events": self_url + "/events"},
    }
