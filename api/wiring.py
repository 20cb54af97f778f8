"""The API's composition root: ``Services`` with the adapters of the layers below plugged in.

Every process the ``vramq`` command starts on this side (the API, the CLI's commands,
the demo) builds its services here; the worker builds its own
(``vramq.gpu_workers.worker``). Imports no Flask.
"""

from __future__ import annotations

from vramq.jobs.services import Services
from vramq.jobs.settings import Settings
from vramq.storage import store_for


def services(settings: Settings | None = None, *, migrate_db: bool = True) -> Services:
    """``Services`` for ``settings`` (default: from the environment), storing objects
    where ``settings.storage_url`` says; ``migrate_db`` brings the schema up to date."""
    return Services.from_settings(settings or Settings.from_env(), store_factory=store_for, migrate_db=migrate_db)
