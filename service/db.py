"""Engine, sessions and the database clock.

SQLite is made safe for several concurrent requests the way SQLite allows it: WAL so
readers never wait for the writer, a busy timeout instead of "database is locked", and
`BEGIN IMMEDIATE` on every transaction so there is one writer at a time and a claim
cannot interleave with another. PostgreSQL uses row locks instead (see `domain`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as SqlTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import ClrsearchError, InvalidRequest

SQLITE_BUSY_TIMEOUT_MS = 30_000


class DatabaseUnavailable(ClrsearchError):
    """Raised when the database cannot be reached; answered with 503."""

    status_code = 503


def is_sqlite(engine_or_url: Engine | str) -> bool:
    url = engine_or_url if isinstance(engine_or_url, str) else str(engine_or_url.url)
    return url.startswith("sqlite")


def make_engine(url: str) -> Engine:
    if is_sqlite(url):
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )
        _configure_sqlite(engine)
        return engine
    # Up to 40 connections: as many as the thread pool that runs sync routes has threads,
    # so a request never waits for a connection held by one that waits for a thread.
    # No pre-ping: it costs a round trip per request (0.4-0.8 ms here, a tenth of a
    # report). After a database restart the first request on a dead connection fails
    # with 503, which workers retry, and SQLAlchemy then drops every pooled connection.
    return create_engine(url, pool_size=10, max_overflow=30, pool_timeout=10)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # pysqlite's own BEGIN is deferred; take over so that BEGIN IMMEDIATE is used.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        # On the driver's connection: SQLAlchemy's own path for a statement costs more
        # than SQLite takes to run it, and every transaction begins here.
        connection.connection.driver_connection.execute("BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction per request: commit here on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except DataError as error:
        session.rollback()
        # The database refused a value the schema let through (a NUL byte in a string,
        # a number out of the column's range): the client's mistake, not ours.
        raise InvalidRequest(
            f"a value in the request cannot be stored: {str(error.orig).splitlines()[0]}"
        ) from error
    except SqlTimeoutError as error:
        session.rollback()
        raise DatabaseUnavailable(
            "every database connection of this server is busy; retry shortly"
        ) from error
    except OperationalError as error:
        session.rollback()
        raise DatabaseUnavailable(
            f"the database did not answer ({error.orig!s}); retry shortly"
        ) from error
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


_CLOCK = "clrsearch_db_now"
# PostgreSQL's clock at the start of the transaction, as naive UTC (what db_now returns).
POSTGRES_CLOCK_SQL = "timezone('utc', now())"


def db_now(session: Session) -> dt.datetime:
    """The database's clock, as naive UTC, so that leases do not depend on host clocks.

    Read once per transaction (PostgreSQL's `now()` is the transaction's start anyway),
    or given by `remember_db_now` when an earlier statement already fetched it.
    """
    transaction = session.get_transaction()
    remembered = session.info.get(_CLOCK)
    if remembered is not None and remembered[0] is transaction:
        return remembered[1]
    if is_sqlite(session.get_bind()):
        value = session.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        now = dt.datetime.fromisoformat(value)
    else:
        now = session.execute(text(f"SELECT {POSTGRES_CLOCK_SQL}")).scalar_one()
    remember_db_now(session, now)
    return now


def remember_db_now(session: Session, now: dt.datetime) -> None:
    """Keep the clock a statement of this transaction read, for `db_now` to return."""
    session.info[_CLOCK] = (session.get_transaction(), now)
