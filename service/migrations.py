"""Apply clrsearch's Alembic migrations and Optuna's own schema, in one call."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic.config import Config

from alembic import command
from service.settings import normalise_database_url

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def alembic_config(database_url: str) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    config.attributes["database_url"] = normalise_database_url(database_url)
    return config


def upgrade_database(database_url: str) -> None:
    """Bring our tables to the newest revision and create Optuna's storage beside them."""
    # Imported here: Optuna is slow to import and the CLI's other commands do not need it.
    from service.optuna_bridge import prepare_optuna_storage

    command.upgrade(alembic_config(database_url), "head")
    prepare_optuna_storage(database_url)
    logger.info("database at %s is up to date", _redact(database_url))


def _redact(url: str) -> str:
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
