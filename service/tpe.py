"""Optuna's TPE sampler with its per-trial bookkeeping kept between asks.

At 1,000 trials two thirds of an ask of Optuna's `TPESampler` is Python that walks every
finished trial again: its sort key for the split into "below" and "above" (its value, or
for a pruned trial its last step and value) and its parameters turned into the
distributions' internal form. A finished trial never changes, so this sampler works both
out once per trial and keeps them; each ask then only sorts keys and gathers rows. The
Parzen estimators, the candidates, the random numbers and the choice are Optuna's own:
the sampler suggests exactly what `TPESampler` with the same arguments would
(`tests/unit/test_tpe.py` compares them trial for trial).

It overrides `TPESampler._sample` and `_get_internal_repr`, private methods of the
pinned Optuna release (5.0.0). Studies it does not cover (several objectives,
constraints) go to Optuna's own code unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers._tpe.sampler import default_gamma
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class _Ranked:
    """What the split needs of one finished trial, worked out once."""

    complete: bool
    # Complete trials sort by value (best first), pruned ones by (-last step, value).
    key: float | tuple[float, float]
    # Whether constraints mark it infeasible; such studies take Optuna's own path.
    infeasible: bool


def _rank(trial: FrozenTrial, minimize: bool) -> _Ranked:
    infeasible = sum(v for v in trial.constraints.values() if v > 0) > 0
    if trial.state == TrialState.COMPLETE:
        value = float(trial.value)  # type: ignore[arg-type]
        return _Ranked(True, value if minimize else -value, infeasible)
    if not trial.intermediate_values:
        return _Ranked(False, (1.0, 0.0), infeasible)
    step = max(trial.intermediate_values)
    value = trial.intermediate_values[step]
    if math.isnan(value):
        key = (-step, math.inf)
    else:
        key = (-step, value if minimize else -value)
    return _Ranked(False, key, infeasible)


class IncrementalTPESampler(optuna.samplers.TPESampler):
    """`TPESampler` that remembers what it worked out about each finished trial."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # study id -> trial id -> its rank; a finished trial never changes in Optuna.
        self._ranked: dict[int, dict[int, _Ranked]] = {}
        # (search space, study id) -> trial id -> the trial's parameters in the space's
        # internal form; None where the trial lacks one of them.
        self._rows: dict[Hashable, dict[int, tuple[Any, ...] | None]] = {}

    def _sample(self, study: optuna.Study, trial: FrozenTrial,
                search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if study._is_multi_objective() or self._constraints_func is not None:
            return super()._sample(study, trial, search_space)
        states = (*_FINISHED, TrialState.RUNNING) if self._constant_liar else _FINISHED
        trials = study._get_trials(deepcopy=False, states=states,
                                   use_cache=not self._constant_liar)
        split = self._split(study, trial, trials)
        if split is None:  # an infeasible trial: Optuna's code knows what to do with it
            return super()._sample(study, trial, search_space)
        below, above = split
        below_estimator = self._build_parzen_estimator(study, search_space, below, True)
        above_estimator = self._build_parzen_estimator(study, search_space, above, False)
        candidates = below_estimator.sample(self._rng.rng, self._n_ei_candidates)
        scores = self._compute_acquisition_func(candidates, below_estimator, above_estimator)
        chosen = optuna.samplers.TPESampler._compare(candidates, scores)
        return {name: distribution.to_external_repr(chosen[name])
                for name, distribution in search_space.items()}

    def _split(self, study: optuna.Study, trial: FrozenTrial, trials: Sequence[FrozenTrial],
               ) -> tuple[list[FrozenTrial], list[FrozenTrial]] | None:
        """The trials the "below" estimator models and those the "above" one does, each in
        trial-number order, as Optuna splits them; None if a trial is infeasible."""
        minimize = study.direction == StudyDirection.MINIMIZE
        ranks = self._ranked.setdefault(study._study_id, {})
        running = TrialState.RUNNING
        # (sort key, position, trial): the position breaks ties as Optuna's stable sort
        # does, and keeps trials themselves out of the comparison.
        complete: list[tuple[Any, int, FrozenTrial]] = []
        pruned: list[tuple[Any, int, FrozenTrial]] = []
        for other in trials:
            if other.state is running:
                continue
            ranked = ranks.get(other._trial_id)
            if ranked is None:
                ranked = ranks[other._trial_id] = _rank(other, minimize)
            if ranked.infeasible:
                return None
            group = complete if ranked.complete else pruned
            group.append((ranked.key, len(group), other))
        if self._gamma is None:
            self._gamma = default_gamma
        n_below = self._gamma(len(complete) + len(pruned))
        complete.sort()
        pruned.sort()
        complete_below = min(n_below, len(complete))
        pruned_below = min(max(0, n_below - complete_below), len(pruned))
        below_ids = {id(entry[2]) for entry in complete[:complete_below]}
        below_ids.update(id(entry[2]) for entry in pruned[:pruned_below])
        # Optuna's storages list a study's trials by number, the order both sides take.
        below = [other for other in trials if id(other) in below_ids]
        above = [other for other in trials
                 if id(other) not in below_ids and other.number != trial.number]
        return below, above

    def _get_internal_repr(self, trials: list[FrozenTrial],
                           search_space: dict[str, BaseDistribution],
                           study: optuna.Study) -> dict[str, np.ndarray]:
        rows = self._rows.setdefault((tuple(search_space.items()), study._study_id), {})
        running = TrialState.RUNNING
        gathered: list[tuple[Any, ...]] = []
        for other in trials:
            if other.state is running:  # its parameters may still grow
                row = self._row(other, search_space, study)
            else:
                try:
                    row = rows[other._trial_id]
                except KeyError:
                    row = rows[other._trial_id] = self._row(other, search_space, study)
            if row is not None:
                gathered.append(row)
        columns = list(zip(*gathered, strict=True)) or [() for _ in search_space]
        return {name: np.asarray(column) for name, column in zip(search_space, columns,
                                                                 strict=True)}

    def _row(self, trial: FrozenTrial, search_space: dict[str, BaseDistribution],
             study: optuna.Study) -> tuple[Any, ...] | None:
        params = self._get_params(trial, study)
        if not search_space.keys() <= params.keys():
            return None
        return tuple(distribution.to_internal_repr(params[name])
                     for name, distribution in search_space.items())
