"""Optuna's storages driven by hand, side by side: what each would give the server.

    python -m benchmarks.storages --database postgres --trials 1000

Not a goal of its own: the evidence behind the proposals in docs/benchmarks.md. The same
hand-driven loop as `benchmarks.dispatch`'s baselines (ask, report + should_prune each
epoch, tell; TPE, `MedianPruner()`, five parameters) runs on each storage, interleaved
trial by trial so that machine noise falls on all alike:

- `memory`: `InMemoryStorage`, the floor;
- `rdb`: `RDBStorage` (cached), as the server used it before its journal, on
  `--database`;
- `rdb-wal` (SQLite only): the same with WAL and `synchronous=NORMAL`, as our own
  tables already run; Optuna's file otherwise commits with a full sync each time;
- `journal-sql`: a prototype `JournalStorage` backend on the same database, one table of
  JSON log lines, one INSERT per write and one indexed SELECT per read of new lines:
  reads are then served from Optuna's in-memory replay. What a journal "with a backend
  of your own on our database" costs before any batching (the server's own backend,
  `service.optuna_bridge.SqlJournalBackend`, is of this kind).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
from optuna.storages.journal import BaseJournalBackend, JournalStorage  # noqa: E402
from sqlalchemy import (  # noqa: E402
    Column,
    Engine,
    Integer,
    MetaData,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
)

from benchmarks import _common as common  # noqa: E402
from benchmarks._common import Cycle  # noqa: E402


class SqlJournalBackend(BaseJournalBackend):
    """Journal lines in one SQL table. A prototype: one writing process, no batching."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        if url.startswith("sqlite"):
            _wal(self.engine)
        self.table = Table("optuna_journal", MetaData(),
                           Column("id", Integer, primary_key=True, autoincrement=True),
                           Column("line", Text, nullable=False))
        self.table.metadata.create_all(self.engine)

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        # Ids start at 1 and this prototype never rolls back, so id = log number + 1.
        with self.engine.connect() as connection:
            rows = connection.execute(select(self.table.c.line)
                                      .where(self.table.c.id > log_number_from)
                                      .order_by(self.table.c.id)).scalars().all()
        return [json.loads(row) for row in rows]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with self.engine.begin() as connection:
            connection.execute(insert(self.table), [{"line": json.dumps(log)} for log in logs])


def _wal(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def wal_rdb(url: str) -> optuna.storages.RDBStorage:
    storage = optuna.storages.RDBStorage(url)
    _wal(storage.engine)
    # Connections made while Optuna created its tables have no WAL settings yet.
    storage.engine.dispose()
    return storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_options(parser, trials=200)
    args = parser.parse_args()
    common.quiet_optuna()
    n = args.trials
    spans = common.windows(n)
    print(f"Optuna storages by hand, {args.database}, {n} trials; {common.machine()}")

    with common.workdir() as folder, \
            common.fresh_database(args.database, folder, args.postgres_url) as rdb_url, \
            common.fresh_database(args.database, folder, args.postgres_url) as wal_url, \
            common.fresh_database(args.database, folder, args.postgres_url) as journal_url:
        drivers = {
            "memory": common.HandDriven(None),
            "rdb": common.HandDriven(rdb_url),
        }
        if args.database == "sqlite":
            drivers["rdb-wal"] = common.HandDriven(wal_rdb(wal_url))
        drivers["journal-sql"] = common.HandDriven(
            JournalStorage(SqlJournalBackend(journal_url)))
        runs: dict[str, list[Cycle]] = {name: [] for name in drivers}
        for index in range(n):
            for name, driver in drivers.items():
                runs[name].append(driver.cycle())
            if (index + 1) % 100 == 0:
                print(f"  {index + 1} trials", file=sys.stderr, flush=True)

    rates = {name: [common.rate([c.total_s for c in cycles[a:b]]) for a, b in spans]
             for name, cycles in runs.items()}
    a, b = spans[-1]
    print()
    print(common.table(
        ["trials/s", *(f"trials {a}-{b}" for a, b in spans), "vs rdb at the end",
         f"ask p50 ms ({a}-{b})", "report p50 ms", "tell p50 ms"],
        [[name, *(f"{value:.1f}" for value in values),
          f"{values[-1] / rates['rdb'][-1]:.2f}x",
          common.ms(common.percentile([c.claim_s for c in runs[name][a:b]], 50)),
          common.ms(common.percentile([s for c in runs[name][a:b] for s in c.report_s], 50)),
          common.ms(common.percentile([c.complete_s for c in runs[name][a:b]], 50))]
         for name, values in rates.items()],
    ))


if __name__ == "__main__":
    main()
