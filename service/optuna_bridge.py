"""Optuna, in one place: storage, samplers, pruners, ask, report, tell.

Optuna's data lives apart from ours: on PostgreSQL in the schema `optuna` of the same
database, on SQLite in a second file beside ours (`clrsearch.db` ->
`clrsearch-optuna.db`), because a SQLite writer there would wait for our own open
transaction.

Optuna keeps it as a journal (`SqlJournalBackend`): an ordered log of operations that
each server process replays into memory, so ask, report and tell work on in-memory
state plus one small query, while several server processes still share one study.
One `optuna.Study` object is kept per study for the life of the process, so its
sampler and pruner are built once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import optuna
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import TrialState
from sqlalchemy import Engine, create_engine, event, text

from clrsearch.spec import CyclicParams, CyclicSpace, FloatRange, StudySpec, searched_params
from service.settings import normalise_database_url

logger = logging.getLogger(__name__)

OPTUNA_SCHEMA = "optuna"
JOURNAL_TABLE = "optuna_journal"
# Any fixed 64-bit number; it names the lock that keeps journal entries in order.
JOURNAL_LOCK_KEY = 0x636C7273_6A726E6C


def optuna_storage_location(database_url: str) -> tuple[str, dict[str, Any]]:
    """Optuna's storage URL and engine arguments for our database URL."""
    url = normalise_database_url(database_url)
    if url.startswith("sqlite"):
        if url in ("sqlite://", "sqlite:///:memory:"):
            raise ValueError(
                "an in-memory SQLite database cannot be shared with Optuna; "
                "give CLRSEARCH_DATABASE_URL a file, e.g. sqlite:///clrsearch.db"
            )
        stem, dot, suffix = url.rpartition(".")
        optuna_url = f"{stem}-optuna.{suffix}" if dot and "/" not in suffix else url + "-optuna"
        return optuna_url, {"connect_args": {"timeout": 30}}
    return url, {
        "connect_args": {"options": f"-csearch_path={OPTUNA_SCHEMA}"},
        "pool_pre_ping": True,
    }


def prepare_optuna_storage(database_url: str) -> None:
    """Create Optuna's schema (PostgreSQL) and the journal table Optuna's log lives in."""
    url, engine_kwargs = optuna_storage_location(database_url)
    if not url.startswith("sqlite"):
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}"))
        engine.dispose()
    backend = SqlJournalBackend(url, engine_kwargs)
    backend.create_table()
    backend.close()


class SqlJournalBackend(BaseJournalBackend):
    """Optuna's journal (its append-only log of operations) in a SQL table.

    Optuna's `JournalStorage` keeps the studies in process memory and replays new log
    entries before each operation, so an ask or a report costs one small SELECT (and one
    INSERT when it writes) instead of the dozens of statements of its RDB storage.

    Every server process reads the same log, so entries must become visible in number
    order with no gaps: appends are serialised (an advisory lock on PostgreSQL; SQLite
    has one writer anyway) and number their entries after the largest one committed.
    """

    def __init__(self, url: str, engine_kwargs: dict[str, Any]) -> None:
        self._sqlite = url.startswith("sqlite")
        self._engine = create_engine(url, **engine_kwargs)
        if self._sqlite:
            _one_writer_at_a_time(self._engine)

    def close(self) -> None:
        self._engine.dispose()

    def create_table(self) -> None:
        with self._engine.begin() as connection:
            connection.execute(text(
                f"CREATE TABLE IF NOT EXISTS {JOURNAL_TABLE} "
                "(log_number BIGINT PRIMARY KEY, entry TEXT NOT NULL)"
            ))

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        with self._engine.connect() as connection:
            rows = connection.execute(
                text(f"SELECT entry FROM {JOURNAL_TABLE} WHERE log_number >= :first "
                     "ORDER BY log_number"),
                {"first": log_number_from},
            ).scalars().all()
        return [json.loads(row) for row in rows]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with self._engine.begin() as connection:
            if not self._sqlite:
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": JOURNAL_LOCK_KEY})
            last = connection.execute(
                text(f"SELECT COALESCE(MAX(log_number), -1) FROM {JOURNAL_TABLE}")
            ).scalar_one()
            connection.execute(
                text(f"INSERT INTO {JOURNAL_TABLE} (log_number, entry) VALUES (:number, :entry)"),
                [{"number": last + 1 + offset, "entry": json.dumps(log)}
                 for offset, log in enumerate(logs)],
            )


@contextlib.contextmanager
def optuna_storage(database_url: str) -> Iterator[optuna.storages.BaseStorage]:
    """Optuna's storage of a clrsearch database, for tools and tests that inspect it."""
    url, engine_kwargs = optuna_storage_location(database_url)
    backend = SqlJournalBackend(url, engine_kwargs)
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
            return optuna.samplers.TPESampler(seed=seed, group=True)
    return optuna.samplers.TPESampler(seed=seed)


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


class OptunaBridge:
    """The server's only door to Optuna. Thread-safe; one per server process."""

    def __init__(self, database_url: str) -> None:
        url, engine_kwargs = optuna_storage_location(database_url)
        self._backend = SqlJournalBackend(url, engine_kwargs)
        self._storage = optuna.storages.JournalStorage(self._backend)
        self._studies: dict[str, optuna.Study] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._backend.close()

    def create_study(self, spec: StudySpec) -> None:
        direction = "minimize" if spec.objective == "val_loss" else "maximize"
        study = optuna.create_study(
            storage=self._storage,
            study_name=spec.name,
            direction=direction,
            sampler=make_sampler(spec),
            pruner=make_pruner(spec),
        )
        for params in spec.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
        with self._lock:
            self._studies[spec.name] = study

    def _study(self, spec: StudySpec) -> optuna.Study:
        with self._lock:
            study = self._studies.get(spec.name)
            if study is None:
                study = optuna.load_study(
                    study_name=spec.name,
                    storage=self._storage,
                    sampler=make_sampler(spec),
                    pruner=make_pruner(spec),
                )
                self._studies[spec.name] = study
            return study

    def ask(self, spec: StudySpec) -> tuple[int, int, CyclicParams]:
        """A new trial: (Optuna trial id, trial number, its settings)."""
        study = self._study(spec)
        trial = study.ask()
        try:
            params = suggest_params(trial, spec.space)
        except Exception:
            study.tell(trial, state=TrialState.FAIL)
            raise
        return trial._trial_id, trial.number, params

    def report(self, spec: StudySpec, optuna_trial_id: int, epoch: int, value: float,
               ask_pruner: bool = True) -> bool:
        """Record one epoch's objective; True when the pruner says stop this trial."""
        trial = optuna.trial.Trial(self._study(spec), optuna_trial_id)
        trial.report(value, epoch)
        # should_prune() may return numpy.bool_, which JSON and pydantic dislike.
        return ask_pruner and bool(trial.should_prune())

    def tell(self, spec: StudySpec, number: int, state: str, value: float | None = None) -> None:
        study = self._study(spec)
        if state == "complete":
            study.tell(number, value, skip_if_finished=True)
        elif state == "pruned":
            study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)

    def importances(self, spec: StudySpec) -> dict[str, float]:
        """Parameter importances by Optuna's default evaluator; empty until 2 trials end."""
        study = self._study(spec)
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(finished) < 2:
            return {}
        return dict(optuna.importance.get_param_importances(study))
