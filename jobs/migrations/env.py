"""Alembic environment: run against the connection handed over by ``jobs.db.migrate``,
or against ``VRAMQ_DATABASE_URL`` when run from the ``alembic`` command line."""

from alembic import context

import vramq.jobs.files  # noqa: F401  (tables outside jobs.schema)
from vramq.jobs.schema import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    from vramq.jobs.db import make_engine
    from vramq.jobs.settings import Settings

    engine = make_engine(Settings.from_env().database_url)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
