"""Alembic environment for clrsearch's tables.

Our version table is `clrsearch_alembic_version`, so that it never meets Optuna's own
`alembic_version` table.
"""

from __future__ import annotations

from alembic import context

from service.db import make_engine
from service.models import Base
from service.settings import ServerSettings, normalise_database_url

VERSION_TABLE = "clrsearch_alembic_version"

config = context.config
url = config.attributes.get("database_url") or ServerSettings().database_url
url = normalise_database_url(url)


def run_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    engine = make_engine(url)
    with engine.connect() as connection:
        _migrate(connection)
    engine.dispose()


def _migrate(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      version_table=VERSION_TABLE, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
