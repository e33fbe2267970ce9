"""Optuna, in one place: storage, samplers, pruners, ask, report, tell.

Optuna keeps its data as a journal: an ordered log of operations (create a trial, set
a parameter, report a value...) in one table of our own database, `optuna_journal`
(in the schema `optuna` on PostgreSQL). Each server process replays the log into
memory once and then only reads the lines other processes have added since.

The journal is written in the request's own transaction, so a claim, a report or a
completion changes our tables and Optuna's in one commit, or in none. Lines must be
numbered in the order every process replays them, and Optuna numbers trials in
that order, so a transaction that may write the journal takes the journal's lock
first (`lock_journal`; PostgreSQL: a transaction-scoped advisory lock, SQLite: its one
writer) and holds it to its commit: it reads what others added, lets Optuna work on
memory, and writes its own lines in one INSERT.

One `optuna.Study` object is kept per study for the life of the process, so its
sampler and pruner are built once.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import functools
import json
import logging
import math
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import TrialState
from sqlalchemy import Connection, Engine, TextClause, create_engine, event, text
from sqlalchemy.orm import Session, SessionTransaction

from clrsearch.spec import CyclicParams, CyclicSpace, FloatRange, StudySpec, searched_params
from service.db import POSTGRES_CLOCK_SQL, remember_db_now
from service.proposer import AskAhead
from service.settings import normalise_database_url
from service.tpe import IncrementalTPESampler

logger = logging.getLogger(__name__)

OPTUNA_SCHEMA = "optuna"
JOURNAL_TABLE = "optuna_journal"
# Any fixed 64-bit number; it names the lock that keeps journal lines in order.
JOURNAL_LOCK_KEY = 0x636C7273_6A726E6C


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def journal_table(database_url: str) -> str:
    """The journal table's name as our own connections see it."""
    url = normalise_database_url(database_url)
    return JOURNAL_TABLE if _is_sqlite(url) else f"{OPTUNA_SCHEMA}.{JOURNAL_TABLE}"


def _legacy_sqlite_journal(url: str) -> Path | None:
    """Before version 0.2 the journal lived in a second SQLite file beside ours."""
    if url in ("sqlite://", "sqlite:///:memory:"):
        return None
    path = Path(url.removeprefix("sqlite:///"))
    return path.with_name(f"{path.stem}-optuna{path.suffix}")


def prepare_optuna_storage(database_url: str) -> None:
    """Create the journal table (and on PostgreSQL Optuna's schema) if missing.

    A journal left by an earlier version in a second SQLite file is copied in once,
    while our table is still empty; the old file is left where it is.
    """
    url = normalise_database_url(database_url)
    table = journal_table(url)
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            if not _is_sqlite(url):
                connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}"))
            connection.execute(text(
                f"CREATE TABLE IF NOT EXISTS {table} "
                "(log_number BIGINT PRIMARY KEY, entry TEXT NOT NULL)"
            ))
            legacy = _legacy_sqlite_journal(url) if _is_sqlite(url) else None
            if legacy is not None and legacy.exists():
                _copy_legacy_journal(connection, table, legacy)
    finally:
        engine.dispose()


def _copy_legacy_journal(connection: Connection, table: str, legacy: Path) -> None:
    if connection.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one():
        return
    old = create_engine(f"sqlite:///{legacy}")
    try:
        with old.connect() as source:
            rows = source.execute(text(
                f"SELECT log_number, entry FROM {JOURNAL_TABLE} ORDER BY log_number"
            )).all()
    finally:
        old.dispose()
    if rows:
        connection.execute(
            text(f"INSERT INTO {table} (log_number, entry) VALUES (:number, :entry)"),
            [{"number": number, "entry": entry} for number, entry in rows],
        )
        logger.info("copied %d lines of Optuna's journal from %s into the main database",
                    len(rows), legacy)


# Statements are built once: every request runs them, and parsing one costs more than a
# round trip to SQLite.
@functools.cache
def _journal_statements(table: str) -> tuple[TextClause, TextClause]:
    return (
        text(f"SELECT entry FROM {table} WHERE log_number >= :first ORDER BY log_number"),
        text(f"INSERT INTO {table} (log_number, entry) VALUES (:number, :entry)"),
    )


_LOCK_AND_CLOCK = text(f"SELECT {POSTGRES_CLOCK_SQL} FROM pg_advisory_xact_lock(:key)")


def _read_journal(connection: Connection, table: str, first: int) -> list[dict[str, Any]]:
    rows = connection.execute(_journal_statements(table)[0], {"first": first}).scalars().all()
    return [json.loads(row) for row in rows]


def _write_journal(connection: Connection, table: str, first: int, entries: list[str]) -> None:
    connection.execute(
        _journal_statements(table)[1],
        [{"number": first + offset, "entry": entry} for offset, entry in enumerate(entries)],
    )


def _take_journal_lock(connection: Connection) -> dt.datetime | None:
    """Wait for the journal's lock; on PostgreSQL also read the clock, in the same trip."""
    if connection.dialect.name != "postgresql":
        return None  # SQLite: every transaction of ours begins IMMEDIATE: the one writer
    return connection.execute(_LOCK_AND_CLOCK, {"key": JOURNAL_LOCK_KEY}).scalar_one()


class SqlJournalBackend(BaseJournalBackend):
    """Optuna's journal in our database, for tools and tests that open it on their own.

    Each append is its own transaction under the journal's lock. The server does not use
    this class but `_TransactionJournal`, which writes in the request's transaction.
    """

    def __init__(self, database_url: str) -> None:
        url = normalise_database_url(database_url)
        self._table = journal_table(url)
        self._engine = create_engine(url)
        if _is_sqlite(url):
            _one_writer_at_a_time(self._engine)

    def close(self) -> None:
        self._engine.dispose()

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        with self._engine.connect() as connection:
            return _read_journal(connection, self._table, log_number_from)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with self._engine.begin() as connection:
            _take_journal_lock(connection)
            last = connection.execute(
                text(f"SELECT COALESCE(MAX(log_number), -1) FROM {self._table}")
            ).scalar_one()
            _write_journal(connection, self._table, last + 1, [json.dumps(log) for log in logs])


class _ReadOnlyJournal(SqlJournalBackend):
    """The journal as the ask-ahead proposer reads it: committed lines only, no writes.
    Within `one_read`, only the first read goes to the database: a draft reads Optuna's
    storage several times, and what was committed a millisecond later can wait."""

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url)
        self._read_once = False
        self._done = False

    @contextlib.contextmanager
    def one_read(self) -> Iterator[None]:
        self._read_once, self._done = True, False
        try:
            yield
        finally:
            self._read_once = False

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        if self._read_once and self._done:
            return []
        self._done = True
        return super().read_logs(log_number_from)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        raise RuntimeError("the ask-ahead proposer tried to write Optuna's journal")


def read_only_storage(database_url: str) -> optuna.storages.JournalStorage:
    """Optuna's storage over committed journal lines; any write raises."""
    return optuna.storages.JournalStorage(_ReadOnlyJournal(database_url))


@contextlib.contextmanager
def optuna_storage(database_url: str) -> Iterator[optuna.storages.BaseStorage]:
    """Optuna's storage of a clrsearch database, for tools and tests that inspect it."""
    backend = SqlJournalBackend(database_url)
    try:
        yield optuna.storages.JournalStorage(backend)
    finally:
        backend.close()


def _one_writer_at_a_time(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA busy_timeout=30000")

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


_JOURNAL_HOLDER = "clrsearch_optuna_bridge"


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    bridge = session.info.get(_JOURNAL_HOLDER)
    if bridge is not None:
        bridge._transaction_committed(session)


@event.listens_for(Session, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    bridge = session.info.get(_JOURNAL_HOLDER)
    if bridge is not None and transaction.parent is None:
        bridge._transaction_ended(session)


class _TransactionJournal(BaseJournalBackend):
    """The server's journal backend: reads and writes go through the request's transaction.

    While a transaction holds the journal (`attach`), the first read fetches the lines
    other processes committed since this process last looked; Optuna's appends are kept
    in memory and handed back to its reads (that is how `JournalStorage` applies its own
    lines), and `flush` writes them in one INSERT. No other read is needed: nobody else
    can append while the lock is held. Outside a transaction (importances, a first load)
    reads see committed lines only and appends are refused.
    """

    def __init__(self, engine: Engine, table: str) -> None:
        self._engine = engine
        self._table = table
        self._connection: Connection | None = None
        self._fetched = False
        self._stored = 0  # lines in the database, as far as this transaction knows
        self._pending: list[str] = []  # this transaction's lines, as JSON, not yet written
        self._pending_logs: list[dict[str, Any]] = []
        self._memory_only = threading.local()

    @contextlib.contextmanager
    def memory_only(self) -> Iterator[None]:
        """Within this block, this thread's reads apply nothing new and touch no database."""
        self._memory_only.active = True
        try:
            yield
        finally:
            self._memory_only.active = False

    def attach(self, connection: Connection) -> None:
        self._connection, self._fetched = connection, False
        self._pending, self._pending_logs = [], []

    def detach(self) -> None:
        self._connection = None
        self._pending, self._pending_logs = [], []

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        if getattr(self._memory_only, "active", False):
            return []  # a proposal samples on memory as it is (OptunaBridge.propose)
        if self._connection is None:
            with self._engine.connect() as connection:
                return _read_journal(connection, self._table, log_number_from)
        if not self._fetched:
            stored = _read_journal(self._connection, self._table, log_number_from)
            self._stored, self._fetched = log_number_from + len(stored), True
            return stored + self._pending_logs
        return self._pending_logs[max(0, log_number_from - self._stored):]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        if self._connection is None:
            raise RuntimeError("Optuna's journal written outside a transaction that holds it")
        for log in logs:
            # Apply what the other processes will read back, not the caller's objects.
            line = json.dumps(log)
            self._pending.append(line)
            self._pending_logs.append(json.loads(line))

    def flush(self) -> None:
        if self._connection is None or not self._pending:
            return
        if not self._fetched:
            # Lines cannot be numbered before the transaction has read to the end.
            raise RuntimeError("Optuna's journal appended before it was read")
        _write_journal(self._connection, self._table, self._stored, self._pending)
        self._stored += len(self._pending)
        self._pending, self._pending_logs = [], []

def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    seed = spec.sampler_seed
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if spec.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    if isinstance(spec.space.mode, list) and "gamma" in searched_params(spec.space):
        # gamma exists only in exp_range trials; group=True lets multivariate TPE model it
        # in its own group instead of sampling it independently. Optuna marks `group`
        # experimental; it has been stable since Optuna 2.8.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return IncrementalTPESampler(seed=seed, group=True)
    return IncrementalTPESampler(seed=seed)


class CycleEndPercentilePruner(optuna.pruners.BasePruner):
    """Median or percentile pruning that compares trials only at the ends of cycles.

    The server reports a cycle-aware trial's value to Optuna only at epochs that end a
    cycle (`clrsearch.cycles`), so every intermediate value here sits at an LR trough.
    Trials with different cycle lengths rarely share such an epoch, so a trial's latest
    value is compared with each finished trial's latest value at or before that epoch,
    rather than with values at exactly the same epoch as Optuna's own pruners do.
    """

    def __init__(self, percentile: float, n_startup_trials: int, n_warmup_steps: int) -> None:
        self.percentile = percentile
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps:
            return False
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not finished or len(finished) < self.n_startup_trials:
            return False
        comparable = []
        for other in finished:
            earlier = [s for s in other.intermediate_values if s <= step]
            if earlier:
                comparable.append(other.intermediate_values[max(earlier)])
        if not comparable:
            return False
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
        cut = float(np.nanpercentile(comparable, self.percentile if minimize
                                     else 100 - self.percentile))
        return value > cut if minimize else value < cut


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    pruner = spec.pruner
    assert not isinstance(pruner, str)  # the spec's validator expands the shorthand
    epochs = spec.task.epochs
    if spec.cycle_aware_pruning and pruner.name in ("median", "percentile"):
        return CycleEndPercentilePruner(
            50.0 if pruner.name == "median" else pruner.percentile,
            n_startup_trials=pruner.n_startup_trials, n_warmup_steps=pruner.n_warmup_steps,
        )
    if pruner.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=pruner.n_startup_trials, n_warmup_steps=pruner.n_warmup_steps
        )
    if pruner.name == "percentile":
        return optuna.pruners.PercentilePruner(
            pruner.percentile,
            n_startup_trials=pruner.n_startup_trials,
            n_warmup_steps=pruner.n_warmup_steps,
        )
    if pruner.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=epochs, reduction_factor=pruner.reduction_factor
        )
    if pruner.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=1, reduction_factor=pruner.reduction_factor
        )
    return optuna.pruners.NopPruner()


def suggest_params(trial: optuna.Trial, space: CyclicSpace) -> CyclicParams:
    """Turn the space into one trial's concrete settings, asking Optuna for searched ones."""

    def number(name: str, value: float | FloatRange | None) -> float | None:
        if isinstance(value, FloatRange):
            return trial.suggest_float(name, value.low, value.high, log=value.log)
        return value

    def choice(name: str, value: Any) -> Any:
        if isinstance(value, list):
            return trial.suggest_categorical(name, value) if len(value) > 1 else value[0]
        return value

    max_lr = number("max_lr", space.max_lr)
    if space.lr_ratio is not None:
        base_lr = max_lr / number("lr_ratio", space.lr_ratio)
    else:
        base_lr = number("base_lr", space.base_lr)
    mode = choice("mode", space.mode)
    # gamma only shapes exp_range, so it is searched only for those trials.
    gamma = number("gamma", space.gamma) if mode == "exp_range" else 1.0
    return CyclicParams(
        base_lr=base_lr,
        max_lr=max_lr,
        step_size_up=number("step_size_up", space.step_size_up),
        step_size_down=number("step_size_down", space.step_size_down),
        step_size_unit=space.step_size_unit,
        mode=mode,
        gamma=gamma,
        scale_mode=choice("scale_mode", space.scale_mode),
        cycle_momentum=choice("cycle_momentum", space.cycle_momentum),
        base_momentum=number("base_momentum", space.base_momentum),
        max_momentum=number("max_momentum", space.max_momentum),
    )


# Samplers whose suggestion for a trial needs nothing of that trial in storage.
PROPOSING_SAMPLERS = ("tpe", "random")


@dataclass(frozen=True)
class Proposal:
    """A trial's settings sampled ahead of its ask (`OptunaBridge.propose`)."""

    study: str
    number: int
    optuna_params: dict[str, Any]
    params: CyclicParams
    system_attrs: dict[str, Any]
    # Finished trials of the study in the copy it was sampled on (ask-ahead's freshness).
    finished: int = 0
    # The distribution of each of `optuna_params`, as the sampler was asked for it.
    distributions: dict[str, Any] = field(default_factory=dict)


def _draft(study: optuna.Study, spec: StudySpec) -> Proposal | None:
    """The study's next trial as `ask` would sample it, with nothing written; None while
    trials wait in Optuna's queue (the ask takes those)."""
    study._thread_local.cached_all_trials = None  # what `Study.ask` does first
    states = _trial_states(study)
    if TrialState.WAITING in states:
        return None
    draft = _DraftTrial(study, len(states))
    params = suggest_params(draft, spec.space)
    return Proposal(spec.name, draft.number, draft.chosen, params, draft.system_attrs,
                    _finished_count(states), dict(draft.distributions))


_FINISHED = frozenset(state for state in TrialState if state.is_finished())


def _trial_states(study: optuna.Study) -> list[TrialState]:
    """Every trial's state, in number order. The loops over a study's trials run on each
    claim, so they are kept to plain list and set operations (a generator calling
    `TrialState.is_finished()` per trial took 2.5 ms at 10,000 trials)."""
    return [trial.state for trial in study.get_trials(deepcopy=False)]


def _finished_count(states: list[TrialState]) -> int:
    return sum(map(_FINISHED.__contains__, states))


def draft_next_trial(storage: optuna.storages.BaseStorage, studies: dict[str, optuna.Study],
                     spec: StudySpec) -> Proposal | None:
    """The ask-ahead proposer's draft (`service.proposer`); `studies` are kept between
    calls, so that each draft reads only the journal's new lines."""
    study = studies.get(spec.name)
    if study is None:
        try:
            study = optuna.load_study(study_name=spec.name, storage=storage,
                                      sampler=make_sampler(spec), pruner=make_pruner(spec))
        except KeyError:
            return None  # created by a transaction not yet committed
        studies[spec.name] = study
    backend = getattr(storage, "_backend", None)
    with (backend.one_read() if isinstance(backend, _ReadOnlyJournal)
          else contextlib.nullcontext()):
        return _draft(study, spec)


_DRAFT_TRIAL_ID = -1


class _DraftStorage:
    """Optuna's storage as a draft trial's sampler sees it: reads pass through; the only
    write a sampler makes for the trial it samples, its system attributes, is kept."""

    def __init__(self, storage: optuna.storages.BaseStorage, attrs: dict[str, Any]) -> None:
        self._storage = storage
        self._attrs = attrs

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if trial_id != _DRAFT_TRIAL_ID:
            raise RuntimeError("a sampler wrote to another trial while drafting one")
        self._attrs[key] = value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


class _DraftTrial:
    """What `optuna.Trial` does when a parameter is suggested, for a trial not yet stored:
    the same sampler calls in the same order (relative sampling once, at the first
    parameter that needs it; independent sampling for the rest), nothing written."""

    def __init__(self, study: optuna.Study, number: int) -> None:
        self.number = number
        self.chosen: dict[str, Any] = {}
        # TPE's constant liar stores a trial's relative sampling in its system attributes;
        # they are kept here and stored by `ask` with the trial.
        self.system_attrs: dict[str, Any] = {}
        study = copy.copy(study)
        study._storage = _DraftStorage(study._storage, self.system_attrs)
        self._study = study
        self._frozen = optuna.trial.FrozenTrial(
            number=number, state=TrialState.RUNNING, value=None,
            datetime_start=dt.datetime.now(), datetime_complete=None, params={},
            distributions={}, user_attrs={}, system_attrs={}, intermediate_values={},
            trial_id=_DRAFT_TRIAL_ID,
        )
        self._filtered = optuna.pruners._filter_study(study, self._frozen)
        study.sampler.before_trial(self._filtered, self._frozen)
        self._space: dict[str, Any] | None = None
        self._relative: dict[str, Any] = {}

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        return self._suggest(name, optuna.distributions.FloatDistribution(low, high, log=log))

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self._suggest(name, optuna.distributions.CategoricalDistribution(choices))

    def _suggest(self, name: str, distribution: Any) -> Any:
        sampler = self._study.sampler
        if distribution.single():
            value = optuna.distributions._get_single_value(distribution)
        else:
            if self._space is None:
                self._space = sampler.infer_relative_search_space(self._filtered, self._frozen)
                self._relative = sampler.sample_relative(
                    self._filtered, self._frozen, self._space)
            relative = self._relative.get(name)
            if name in self._relative and distribution._contains(
                    distribution.to_internal_repr(relative)):
                value = relative
            else:
                value = sampler.sample_independent(
                    optuna.pruners._filter_study(self._study, self._frozen), self._frozen,
                    name, distribution)
        self._frozen.distributions[name] = distribution
        self._frozen.params[name] = value
        self.chosen[name] = value
        return value

    @property
    def distributions(self) -> dict[str, Any]:
        return self._frozen.distributions


def _still_fits(study: optuna.Study, spec: StudySpec, proposal: Proposal) -> bool:
    """Whether `ask` may store this draft as the study's next trial: drafted for this
    study, no trial waits in Optuna's queue (the ask takes those), and, under Hyperband,
    which samples each trial among its bracket's, chosen by number, not overtaken."""
    if proposal.study != spec.name:
        return False
    states = _trial_states(study)
    overtaken = len(states) != proposal.number
    return TrialState.WAITING not in states and not (
        overtaken and isinstance(study.pruner, optuna.pruners.HyperbandPruner))


class OptunaBridge:
    """The server's only door to Optuna. Thread-safe; one per server process.

    A transaction that may change Optuna's data calls `lock_journal(session)` before it
    takes any other lock (so that no two transactions wait for each other's locks) and
    keeps the journal until it commits or rolls back; only then may the methods that
    write (`create_study`, `ask`, `report`, `tell`) be called. When the transaction
    rolls back, Optuna's state in memory holds lines that were never written, so it is
    dropped and replayed from the database at the next use.
    """

    def __init__(self, engine: Engine, ask_ahead: AskAhead | None = None) -> None:
        table = JOURNAL_TABLE if engine.dialect.name == "sqlite" else (
            f"{OPTUNA_SCHEMA}.{JOURNAL_TABLE}")
        self._ask_ahead = ask_ahead
        # Studies whose next trial is drafted again once this transaction commits.
        # (spec, whether a trial was asked: then the draft is redone whatever its age).
        self._draft_after_commit: dict[str, tuple[StudySpec, bool]] = {}
        self.drafted_claims = 0  # claims served from an ask-ahead draft, for tests
        self._backend = _TransactionJournal(engine, table)
        self._storage: optuna.storages.JournalStorage | None = None
        self._studies: dict[str, optuna.Study] = {}
        # Held by the transaction that holds the journal, and by reads outside one, so
        # that nobody sees lines of a transaction that may yet roll back.
        self._lock = threading.RLock()
        self._proposing: dict[str, threading.Lock] = {}
        self._holder: Session | None = None
        self._committed = False

    def close(self) -> None:
        """Stop the ask-ahead proposer, if any; the engine belongs to the caller."""
        if self._ask_ahead is not None:
            self._ask_ahead.close()

    def lock_journal(self, session: Session) -> None:
        """Hold Optuna's journal until this session's transaction ends."""
        if self._holder is session:
            return
        self._lock.acquire()
        try:
            if self._holder is not None:
                raise RuntimeError("this thread already holds Optuna's journal in another "
                                   "session")
            connection = session.connection()
            clock = _take_journal_lock(connection)
        except BaseException:
            self._lock.release()
            raise
        if clock is not None:
            remember_db_now(session, clock)
        self._holder, self._committed = session, False
        session.info[_JOURNAL_HOLDER] = self
        self._backend.attach(connection)

    def _transaction_committed(self, session: Session) -> None:
        if self._holder is not session:
            return
        self._committed = True
        if self._ask_ahead is not None:
            # After the commit, so that the proposer reads what this transaction wrote.
            for spec, asked in self._draft_after_commit.values():
                study = self._studies.get(spec.name)
                finished = (_finished_count(_trial_states(study)) if study is not None
                            else 0)
                self._ask_ahead.request(spec.model_dump(mode="json"), finished, asked)
        self._draft_after_commit.clear()

    def _transaction_ended(self, session: Session) -> None:
        if self._holder is not session:
            return
        if not self._committed:
            logger.info("transaction rolled back: Optuna's state is replayed at next use")
            self._storage = None
            self._studies.clear()
        self._backend.detach()
        self._draft_after_commit.clear()
        self._holder = None
        session.info.pop(_JOURNAL_HOLDER, None)
        self._lock.release()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        with self._lock:
            if self._holder is None:
                raise RuntimeError("Optuna's data changed without lock_journal(session)")
            yield
            self._backend.flush()

    def _journal_storage(self) -> optuna.storages.JournalStorage:
        if self._storage is None:
            self._storage = optuna.storages.JournalStorage(self._backend)
        return self._storage

    def create_study(self, spec: StudySpec) -> None:
        direction = "minimize" if spec.objective == "val_loss" else "maximize"
        with self._writing():
            study = optuna.create_study(
                storage=self._journal_storage(),
                study_name=spec.name,
                direction=direction,
                sampler=make_sampler(spec),
                pruner=make_pruner(spec),
            )
            for params in spec.enqueue:
                study.enqueue_trial(params, skip_if_exists=True)
            self._studies[spec.name] = study
            self._draft_again(spec, asked=True)

    def _study(self, spec: StudySpec) -> optuna.Study:
        with self._lock:
            study = self._studies.get(spec.name)
            if study is None:
                study = optuna.load_study(
                    study_name=spec.name,
                    storage=self._journal_storage(),
                    sampler=make_sampler(spec),
                    pruner=make_pruner(spec),
                )
                self._studies[spec.name] = study
            return study

    @property
    def ask_ahead(self) -> AskAhead | None:
        return self._ask_ahead

    def _draft_again(self, spec: StudySpec, asked: bool) -> None:
        if self._ask_ahead is not None and spec.sampler in PROPOSING_SAMPLERS:
            before = self._draft_after_commit.get(spec.name)
            self._draft_after_commit[spec.name] = (spec, asked or bool(before and before[1]))

    def next_proposal(self, spec: StudySpec) -> Proposal | None:
        """Settings for the study's next trial, sampled outside the journal's lock: the
        ask-ahead proposer's draft when it is fresh enough (`service.proposer`), else
        sampled here and now (`propose`)."""
        study = self._studies.get(spec.name)
        if self._ask_ahead is not None and study is not None and (
                spec.sampler in PROPOSING_SAMPLERS):
            with self._backend.memory_only():
                finished = _finished_count(_trial_states(study))
            drafted = self._ask_ahead.take(spec.name, finished)
            if drafted is not None:
                self.drafted_claims += 1
                return drafted
        return self.propose(spec)

    def propose(self, spec: StudySpec) -> Proposal | None:
        """The sampler's settings for the study's next trial, worked out before the claim
        takes the journal's lock, so that reports and other claims do not wait for TPE.

        Sampled on this process's copy of the study as it stands (lines other processes
        wrote since this one last held the lock are not read), with the very calls an
        ask would make, in the same order: one worker's sequential study gets the same
        trials as plain Optuna. `ask` takes the proposal even if other trials were asked
        since (it then missed those, as parallel workers' suggestions do in Optuna),
        except under Hyperband. None where a sampler needs the new trial stored first
        (CMA-ES, QMC, GP), where trials wait in Optuna's queue, or while another thread
        proposes for the same study: that claim then samples under the lock.
        """
        study = self._studies.get(spec.name)  # not loaded yet: the first ask loads it
        if spec.sampler not in PROPOSING_SAMPLERS or study is None:
            return None
        proposing = self._proposing.setdefault(spec.name, threading.Lock())
        if not proposing.acquire(blocking=False):
            return None
        try:
            with self._backend.memory_only():
                return _draft(study, spec)
        except Exception:
            # The copy changed under the sampler (another thread's transaction): the
            # claim asks under the lock instead.
            logger.debug("proposal for study %r dropped", spec.name, exc_info=True)
            return None
        finally:
            proposing.release()

    def ask(
        self, spec: StudySpec, proposal: Proposal | None = None
    ) -> tuple[int, int, CyclicParams]:
        """A new trial: (Optuna trial id, trial number, its settings)."""
        with self._writing():
            study = self._study(spec)
            if proposal is not None and not _still_fits(study, spec, proposal):
                proposal = None  # sampled afresh, below
            if proposal is None:
                trial = study.ask()
            else:
                # The trial is stored as the sampler drafted it, in one journal line: what
                # `ask` and a suggestion per parameter would store in seven or more. A
                # draft overtaken by another claim missed only the trials asked since, as
                # parallel workers' suggestions do in plain Optuna.
                study._thread_local.cached_all_trials = None  # as `ask` does
                trial_id = study._storage.create_new_trial(
                    study._study_id, template_trial=optuna.trial.create_trial(
                        state=TrialState.RUNNING, params=proposal.optuna_params,
                        distributions=proposal.distributions,
                        system_attrs=proposal.system_attrs))
                trial = optuna.Trial(study, trial_id)
            try:
                params = suggest_params(trial, spec.space)
            except Exception:
                study.tell(trial, state=TrialState.FAIL)
                raise
            if proposal is not None and params != proposal.params:
                logger.warning("trial %d of study %r: Optuna gave %s, not the proposed %s",
                               trial.number, spec.name, params, proposal.params)
            self._draft_again(spec, asked=True)
            return trial._trial_id, trial.number, params

    def report(self, spec: StudySpec, optuna_trial_id: int, epoch: int, value: float,
               ask_pruner: bool = True) -> bool:
        """Record one epoch's objective; True when the pruner says stop this trial."""
        with self._writing():
            trial = optuna.trial.Trial(self._study(spec), optuna_trial_id)
            trial.report(value, epoch)
            # should_prune() may return numpy.bool_, which JSON and pydantic dislike.
            return ask_pruner and bool(trial.should_prune())

    def tell(self, spec: StudySpec, number: int, state: str, value: float | None = None) -> None:
        with self._writing():
            study = self._study(spec)
            if state == "complete":
                study.tell(number, value, skip_if_finished=True)
            elif state == "pruned":
                study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
            else:
                study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            self._draft_again(spec, asked=False)

    def importances(self, spec: StudySpec) -> dict[str, float]:
        """Parameter importances by Optuna's default evaluator; empty until 2 trials end."""
        with self._lock:
            study = self._study(spec)
            finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if len(finished) < 2:
                return {}
            # Evaluated on a copy, so that the fit does not hold the journal.
            trials = study.get_trials(deepcopy=True)
            directions = study.directions
        evaluated = optuna.create_study(directions=directions)
        evaluated.add_trials(trials)
        return dict(optuna.importance.get_param_importances(evaluated))
