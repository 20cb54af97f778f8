"""Wiring: from settings to the live objects a process needs (database, catalog, broker, store).

Built once per process and passed down; nothing here runs at import time. The object
store is an adapter from a layer above (``ports.ObjectStore``): whoever builds the
services passes a ``store_factory`` (``vramq.api.wiring``, the worker).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING

from .catalog import Catalog, load_catalog, load_embedded_catalog
from .db import make_engine, make_sessionmaker, migrate
from .errors import ConfigError
from .lifecycle import utcnow
from .ports import ObjectStore, StoreFactory
from .queue import make_celery
from .settings import Settings

if TYPE_CHECKING:
    from celery import Celery
    from redis import Redis
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from .heartbeat import ServedModels
    from .ledger import Allowances
    from .pricing import Estimator


def load_configured_catalog(settings: Settings) -> Catalog:
    if settings.catalog is not None:
        return load_catalog(settings.catalog)
    return load_embedded_catalog(settings.models_dir, small=settings.small_models)


@dataclass
class Services:
    """The process's handles on the outside world. Properties connect lazily."""

    settings: Settings
    broker_url: str
    clock: Callable[[], datetime] = field(default=utcnow)
    """Where submits and usage read the time (tests move it across a day boundary)."""
    store_factory: StoreFactory | None = None
    """Builds ``store`` from the settings (``vramq.storage.store_for``)."""

    def now(self) -> datetime:
        return self.clock()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, store_factory: StoreFactory | None, migrate_db: bool = True
    ) -> Services:
        broker_url = settings.broker_url
        if broker_url is None:
            from .embedded import ensure_redis

            broker_url, _ = ensure_redis(settings.data_dir)
        services = cls(settings=settings, broker_url=broker_url, store_factory=store_factory)
        if migrate_db:
            migrate(services.engine)
        return services

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.database_url, dead_peer_s=max(self.settings.lease_s / 2, 2.0))

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return make_sessionmaker(self.engine)

    @cached_property
    def catalog(self) -> Catalog:
        return load_configured_catalog(self.settings)

    @cached_property
    def estimator(self) -> Estimator:
        """Quotes jobs' costs, calibrated from recent runs (``pricing.Estimator``)."""
        from .pricing import Estimator

        return Estimator(self.sessions)

    @cached_property
    def allowances(self) -> Allowances:
        from .ledger import Allowances

        return Allowances(self.settings)

    @cached_property
    def celery(self) -> Celery:
        return make_celery(self.broker_url, self.settings.visibility_timeout_s, list(self.catalog.models))

    @cached_property
    def store(self) -> ObjectStore:
        """Where job inputs and outputs live, built by ``store_factory`` on first use."""
        if self.store_factory is None:
            raise ConfigError("these services were built without an object store (no store_factory)")
        return self.store_factory(self.settings)

    @cached_property
    def served(self) -> ServedModels:
        """Which models live workers serve, cached briefly (``heartbeat.ServedModels``)."""
        from .heartbeat import ServedModels

        return ServedModels(self.redis)

    @cached_property
    def redis(self) -> Redis:
        """A plain Redis client on the broker (readiness checks, heartbeats)."""
        import redis

        return redis.Redis.from_url(self.broker_url, socket_timeout=2, socket_connect_timeout=2)
