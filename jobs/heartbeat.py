"""Workers announce themselves in Redis; a key that is not renewed expires with its worker."""

from __future__ import annotations

import json

PREFIX = "vramq:workers:"
TTL_S = 15


def announce(redis, name: str, info: dict) -> None:
    redis.set(PREFIX + name, json.dumps(info), ex=TTL_S)


def live_workers(redis) -> list[dict]:
    """Workers that announced themselves within the last ``TTL_S`` seconds."""
    out = []
    for key in redis.scan_iter(PREFIX + "*"):
        raw = redis.get(key)
        if raw:
            out.append(json.loads(raw))
    return out


def withdraw(redis, name: str) -> None:
    redis.delete(PREFIX + name)
