"""Optuna's TPE sampler with its per-trial bookkeeping kept between asks.

At 1,000 trials two thirds of an ask of Optuna's `TPESampler` is Python that walks every
finished trial again: its sort key for the split into "below" and "above" (its value, or
for a pruned trial its last step and value) and its parameters turned into the
distributions' internal form. A finished trial never changes, so this sampler works both
out once per trial and keeps them in arrays; each ask then sorts and selects with numpy.
The Parzen estimators, the candidates, the random numbers and the choice are Optuna's
own: the sampler suggests exactly what `TPESampler` with the same arguments would
(`tests/unit/test_tpe.py` compares them trial for trial).

What is kept is only ever what the study's storage showed as finished; the server
drops its Optuna objects, samplers included, when a transaction that changed them rolls
back (`OptunaBridge`), so a result that was never committed is not remembered.

It overrides `TPESampler._sample`, a private method of the pinned Optuna release
(5.0.0). Studies it does not cover (several objectives, constraints) go to Optuna's own
code unchanged.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers._tpe.sampler import default_gamma
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class _Rows:
    """A growing array with one row per finished trial, in the order first seen."""

    def __init__(self, width: int) -> None:
        self._data = np.empty((16, width))
        self.size = 0

    def append(self, row: Sequence[float]) -> None:
        if self.size == len(self._data):
            self._data = np.concatenate([self._data, np.empty_like(self._data)])
        self._data[self.size] = row
        self.size += 1

    @property
    def data(self) -> np.ndarray:
        return self._data[: self.size]


class _StudyMemory:
    """What the split and the estimators need of a study's finished trials, each worked
    out once: a row per trial, indexed by `index`.

    The server samples a study in two threads at once at times (a claim's proposal
    outside the journal's lock, another claim's ask under it), so rows are added and
    read under a lock, or two threads could add the same trial and the rows would no
    longer line up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.index: dict[int, int] = {}  # trial id -> row
        self.trials: list[FrozenTrial] = []
        # complete (1.0 or 0.0), primary key, secondary key. Complete trials sort by
        # value, best first; pruned ones by (-last step, last value); see `_keys`.
        self.keys = _Rows(3)
        self.infeasible = False
        # search space -> (the trial's parameters in their internal form, whether the
        # trial has every parameter of the space: 1.0 or 0.0)
        self.params: dict[Hashable, _Rows] = {}

    def rows_of(self, trials: list[FrozenTrial], minimize: bool,
                ) -> tuple[np.ndarray, np.ndarray]:
        """Each trial's row and its sort keys, adding trials seen for the first time."""
        with self._lock:
            for trial in trials:
                if trial._trial_id not in self.index:
                    self.index[trial._trial_id] = len(self.trials)
                    self.trials.append(trial)
                    self.keys.append(_keys(trial, minimize))
                    self.infeasible |= any(v > 0 for v in trial.constraints.values())
            rows = np.fromiter(map(self.index.__getitem__, (t._trial_id for t in trials)),
                               dtype=np.intp, count=len(trials))
            return rows, self.keys.data[rows]

    def params_of(self, rows: np.ndarray, space: dict[str, BaseDistribution],
                  sampler: IncrementalTPESampler, study: optuna.Study) -> np.ndarray:
        """The parameters of the trials at `rows` in `space`'s internal form, the last
        column 1.0 where the trial has them all."""
        with self._lock:
            kept = self.params.setdefault(tuple(space.items()), _Rows(len(space) + 1))
            for trial in self.trials[kept.size:]:
                kept.append(_internal_row(trial, space, sampler, study))
            return kept.data[rows]


def _keys(trial: FrozenTrial, minimize: bool) -> tuple[float, float, float]:
    if trial.state == TrialState.COMPLETE:
        value = float(trial.value)  # type: ignore[arg-type]
        return (1.0, value if minimize else -value, 0.0)
    if not trial.intermediate_values:
        return (0.0, 1.0, 0.0)
    step = max(trial.intermediate_values)
    value = trial.intermediate_values[step]
    if math.isnan(value):
        return (0.0, -step, math.inf)
    return (0.0, -step, value if minimize else -value)


def _internal_row(trial: FrozenTrial, space: dict[str, BaseDistribution],
                  sampler: IncrementalTPESampler, study: optuna.Study) -> list[float]:
    params = sampler._get_params(trial, study)
    if not space.keys() <= params.keys():
        return [0.0] * len(space) + [0.0]
    return [distribution.to_internal_repr(params[name])
            for name, distribution in space.items()] + [1.0]


class IncrementalTPESampler(optuna.samplers.TPESampler):
    """`TPESampler` that remembers what it worked out about each finished trial."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # study id -> what is known of its finished trials (they never change in Optuna)
        self._memory: dict[int, _StudyMemory] = {}

    def _sample(self, study: optuna.Study, trial: FrozenTrial,
                search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if study._is_multi_objective() or self._constraints_func is not None:
            return super()._sample(study, trial, search_space)
        states = (*_FINISHED, TrialState.RUNNING) if self._constant_liar else _FINISHED
        trials = study._get_trials(deepcopy=False, states=states,
                                   use_cache=not self._constant_liar)
        observations = self._split(study, trial, trials, search_space)
        if observations is None:  # an infeasible trial: Optuna's code knows what to do
            return super()._sample(study, trial, search_space)
        below, above = (self._parzen_estimator_cls(side, search_space,
                                                   self._parzen_estimator_parameters)
                        for side in observations)
        candidates = below.sample(self._rng.rng, self._n_ei_candidates)
        scores = self._compute_acquisition_func(candidates, below, above)
        chosen = self._compare(candidates, scores)
        return {name: distribution.to_external_repr(chosen[name])
                for name, distribution in search_space.items()}

    def _split(self, study: optuna.Study, trial: FrozenTrial, trials: list[FrozenTrial],
               search_space: dict[str, BaseDistribution],
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
        """The observations of the "below" estimator and of the "above" one, split and
        ordered by trial number as Optuna's TPE does; None if a trial is infeasible."""
        memory = self._memory.setdefault(study._study_id, _StudyMemory())
        running_state = TrialState.RUNNING
        finished = [other for other in trials if other.state is not running_state]
        running = [other for other in trials
                   if other.state is running_state and other.number != trial.number]
        rows, keys = memory.rows_of(finished, study.direction == StudyDirection.MINIMIZE)
        if memory.infeasible:
            return None
        if self._gamma is None:
            self._gamma = default_gamma
        n_below = self._gamma(len(finished))

        complete = np.flatnonzero(keys[:, 0] == 1.0)
        pruned = np.flatnonzero(keys[:, 0] == 0.0)
        # Stable sorts, so that ties keep trial-number order as Optuna's `sorted` does.
        complete = complete[np.argsort(keys[complete, 1], kind="stable")]
        pruned = pruned[np.lexsort((keys[pruned, 2], keys[pruned, 1]))]
        complete_below = min(n_below, len(complete))
        pruned_below = min(max(0, n_below - complete_below), len(pruned))
        is_below = np.zeros(len(finished), dtype=bool)
        is_below[complete[:complete_below]] = True
        is_below[pruned[:pruned_below]] = True

        params = memory.params_of(rows, search_space, self, study)
        # Optuna's storages list a study's trials by number, so finished rows are in order.
        below_rows = params[is_below]
        above_rows = params[~is_below]
        if running:
            numbers = np.array([other.number for other in finished], dtype=np.int64)
            live = np.array([_internal_row(other, search_space, self, study)
                             for other in running]).reshape(len(running), -1)
            live_numbers = np.array([other.number for other in running], dtype=np.int64)
            order = np.argsort(np.concatenate([numbers[~is_below], live_numbers]),
                               kind="stable")
            above_rows = np.concatenate([above_rows, live])[order]
        return _observations(below_rows, search_space), _observations(above_rows, search_space)


def _observations(rows: np.ndarray, space: dict[str, BaseDistribution]) -> dict[str, np.ndarray]:
    """Rows (last column: has every parameter) as the columns Optuna's `_get_internal_repr`
    gives: float64, a choice's index as int64."""
    rows = rows[rows[:, -1] == 1.0]
    # Optuna's empty column is np.asarray([]): float64 whatever the distribution.
    whole = len(rows) > 0
    return {name: (rows[:, column].astype(np.int64)
                   if whole and isinstance(distribution, CategoricalDistribution)
                   else rows[:, column])
            for column, (name, distribution) in enumerate(space.items())}
