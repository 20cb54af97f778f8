"""The results manifest: one JSON line per job of a finished batch, in submission order."""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from ..schema import Batch
from ..views import Links, job_json
from .views import page

MANIFEST_MAX_LINK_S = 7 * 24 * 3600
"""Links inside a manifest last until the outputs' retention ends, at most this (the
longest an S3 presigned URL may last)."""


def manifest(session: Session, batch: Batch, links: Links) -> bytes:
    """The results, one JSON line per job in submission order."""
    out = []
    after = None
    while True:
        jobs = page(session, batch.id, after, 1000)
        if not jobs:
            break
        for job in jobs:
            data = job_json(job, links)
            out.append(
                json.dumps(
                    {
                        "custom_id": job.custom_id,
                        "job_id": job.id,
                        "status": job.status,
                        "output": data["output"],
                        "error": data["error"],
                    },
                    separators=(",", ":"),
                )
            )
        after = jobs[-1].id
    return ("\n".join(out) + "\n").encode()
