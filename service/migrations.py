"""Apply clrsearch's Alembic migrations and Optuna's own schema, in one call."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from service.settings import normalise_database_url

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Any fixed 64-bit number; it names the lock that serialises migrations on PostgreSQL.
MIGRATION_LOCK_KEY = 0x636C7273_65617263


def alembic_config(database_url: str) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    config.attributes["database_url"] = normalise_database_url(database_url)
    return config


def upgrade_database(database_url: str) -> None:
    """Bring our tables to the newest revision and create Optuna's storage beside them."""
    # Imported here: Optuna is slow to import and the CLI's other commands do not need it.
    from service.optuna_bridge import prepare_optuna_storage

    url = normalise_database_url(database_url)
    if url.startswith("sqlite"):
        command.upgrade(alembic_config(url), "head")
        prepare_optuna_storage(url)
    else:
        # Several servers may start at once on an empty database; an advisory lock makes
        # them migrate one after another instead of racing to create the same tables.
        engine = create_engine(url)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT pg_advisory_lock(:key)"),
                                   {"key": MIGRATION_LOCK_KEY})
                connection.commit()
                try:
                    config = alembic_config(url)
                    config.attributes["connection"] = connection
                    command.upgrade(config, "head")
                    connection.commit()
                    prepare_optuna_storage(url)
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"),
                                       {"key": MIGRATION_LOCK_KEY})
                    connection.commit()
        finally:
            engine.dispose()
    logger.info("database at %s is up to date", _redact(database_url))


def _redact(url: str) -> str:
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
