"""`IncrementalTPESampler` suggests exactly what Optuna's `TPESampler` would."""

from __future__ import annotations

import math
import random
import threading
import time
import warnings
from collections.abc import Callable

import optuna
import pytest
from optuna.trial import TrialState

from service.tpe import IncrementalTPESampler

N_TRIALS = 60


def _objective_space(trial: optuna.Trial) -> dict[str, float]:
    max_lr = trial.suggest_float("max_lr", 0.01, 0.5, log=True)
    mode = trial.suggest_categorical("mode", ["triangular", "triangular2", "exp_range"])
    values = {
        "max_lr": max_lr,
        "ratio": trial.suggest_float("ratio", 3.0, 10.0, log=True),
        "steps": trial.suggest_int("steps", 1, 8),
        "half": trial.suggest_float("half", 1.0, 4.0, step=0.5),
        "mode": ["triangular", "triangular2", "exp_range"].index(mode),
    }
    if mode == "exp_range":  # a conditional parameter, as the server's gamma
        values["gamma"] = trial.suggest_float("gamma", 0.9, 1.0)
    return values


def _drive(sampler: optuna.samplers.BaseSampler, direction: str, held_open: int,
           nan_every: int) -> list[tuple[TrialState, dict[str, object]]]:
    """A study with pruned trials (some with NaN reports), ties in values, and up to
    `held_open` trials left running while later ones are asked (the constant liar's case)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler, direction=direction,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3))
    noise = random.Random(7)
    running: list[optuna.Trial] = []
    for index in range(N_TRIALS):
        trial = study.ask()
        values = _objective_space(trial)
        if held_open and index % 5 == 0:
            running.append(trial)
        else:
            loss = math.log(values["max_lr"]) ** 2 + values["mode"] * 0.1
            for epoch in range(1, 5):
                reported = math.nan if nan_every and index % nan_every == 0 else loss / epoch
                trial.report(reported + noise.gauss(0, 0.01), epoch)
                if trial.should_prune():
                    study.tell(trial, state=TrialState.PRUNED)
                    break
            else:
                # Rounded, so that several trials share a value and the tie order counts.
                study.tell(trial, round(loss, 1))
        if len(running) > held_open:
            study.tell(running.pop(0), 1.0)
    return [(trial.state, trial.params) for trial in study.trials]


CASES: dict[str, Callable[[type[optuna.samplers.TPESampler]], optuna.samplers.BaseSampler]] = {
    "defaults": lambda cls: cls(seed=1),
    "no constant liar": lambda cls: cls(seed=2, constant_liar=False),
    "group": lambda cls: cls(seed=3, group=True),
    "independent": lambda cls: cls(seed=4, multivariate=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_suggests_what_optunas_tpe_suggests(case: str, direction: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's experimental and NaN warnings
        theirs = _drive(CASES[case](optuna.samplers.TPESampler), direction, 2, 6)
        ours = _drive(CASES[case](IncrementalTPESampler), direction, 2, 6)
    assert {state for state, _ in theirs} >= {TrialState.COMPLETE, TrialState.PRUNED}
    assert ours == theirs


def test_constraints_take_optunas_own_path() -> None:
    def constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
        return [trial.params["x"] - 1.0]

    def run(sampler: optuna.samplers.BaseSampler) -> list[dict[str, float]]:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=sampler)
        study.optimize(lambda t: t.suggest_float("x", -5.0, 5.0) ** 2, n_trials=25)
        return [t.params for t in study.trials]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (run(IncrementalTPESampler(seed=0, constraints_func=constraints))
                == run(optuna.samplers.TPESampler(seed=0, constraints_func=constraints)))


def test_two_threads_sampling_one_study_keep_its_memory_in_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server samples one study in two threads at times (a proposal outside the
    journal's lock, an ask under it). A thread switch while the first one adds trials to
    the memory must not leave the other reading rows that are not there yet."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = IncrementalTPESampler(seed=0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", -5.0, 5.0) ** 2)
    study.sampler = sampler
    space = {"x": optuna.distributions.FloatDistribution(-5.0, 5.0)}
    current = study.ask()
    trials = study.get_trials(deepcopy=False)

    import service.tpe as tpe

    first_sees = tpe._keys

    def slowly(*args: object) -> tuple[float, float, float]:
        time.sleep(0.002)  # hand the interpreter to the other thread mid-way
        return first_sees(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(tpe, "_keys", slowly)
    results: list[object] = []

    def split() -> None:
        try:
            results.append(sampler._split(study, current, trials, space))
        except Exception as error:  # noqa: BLE001 - the failure is what is checked
            results.append(error)

    threads = [threading.Thread(target=split) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not [r for r in results if isinstance(r, Exception)], results
    memory = sampler._memory[study._study_id]
    assert len(memory.trials) == memory.keys.size == len(memory.index) == 40
    below, above = results[0]  # type: ignore[misc]
    assert len(below["x"]) + len(above["x"]) == 40
