"""Alembic migrations carry existing data forward."""

from __future__ import annotations

import datetime as dt

from alembic import command
from sqlalchemy import create_engine, text

from service.migrations import alembic_config, upgrade_database


def test_0002_counts_each_study_s_existing_cyclic_trials(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "0001")
    now = dt.datetime(2026, 12, 4)
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            for study_id, kinds in ((1, ["cyclic"] * 3 + ["baseline", "range_test"]),
                                    (2, [])):
                connection.execute(text(
                    "INSERT INTO studies (id, name, spec, direction, state, n_trials, "
                    "parallelism, created_at, updated_at) VALUES (:id, :name, '{}', "
                    "'minimize', 'running', 10, 1, :now, :now)"),
                    {"id": study_id, "name": f"s{study_id}", "now": now})
                for number, kind in enumerate(kinds):
                    connection.execute(text(
                        "INSERT INTO trials (study_id, number, kind, state, params, attempts, "
                        "infra_losses, epochs_run, created_at) VALUES (:study, :number, "
                        ":kind, 'complete', '{}', 1, 0, 0, :now)"),
                        {"study": study_id, "number": number, "kind": kind, "now": now})

        upgrade_database(database_url)

        with engine.connect() as connection:
            counts = dict(connection.execute(
                text("SELECT name, cyclic_trials FROM studies ORDER BY name")).all())
    finally:
        engine.dispose()
    assert counts == {"s1": 3, "s2": 0}
