"""The server decides and stores exactly what plain Optuna would for the same reports.

Speed work on the Optuna path (caching, fewer statements, another storage, skipping
calls) must not change what a study does. Each case runs one scenario twice, with the
same sampler seed and pruner: through the server's HTTP API (in process, on SQLite and
on PostgreSQL), and through an in-memory Optuna study driven by hand as its
documentation shows (ask, suggest, report, should_prune, tell), with the server's one
documented rule added: the pruner is not asked at the last epoch. Trials run two at a
time, with their reports interleaved, so that running trials count as they do in a
real study, and every report is sent twice, the second time with another value, as a
worker retrying after a lost answer would.

Compared: the parameters of every trial, every pruning decision, and what is stored
afterwards, both in our tables (through the API) and in the server's Optuna storage:
states, values and intermediate values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from optuna.trial import TrialState

from clrsearch.cycles import cycle_end_epochs
from clrsearch.spec import CyclicParams
from service.app import create_app
from service.optuna_bridge import CycleEndPercentilePruner, optuna_storage
from service.settings import ServerSettings

WORKER = "/api/v1/worker"
STUDY = "equivalence"
SEED = 7
# Two more than TPE's ten random start-up trials, so that TPE itself samples too.
N_TRIALS = 12
BATCHES_PER_EPOCH = 10
# Curves that cross: a trial good at its first epochs is not always good at its last.
BASES = [0.50, 0.90, 0.30, 1.20, 0.70, 0.40, 1.00, 0.20, 0.80, 0.60, 1.10, 0.35]
SLOPES = [0.80, 0.10, 0.50, 0.30, 1.20, 0.05, 0.60, 0.90, 0.20, 0.40, 0.70, 0.15]


@dataclass(frozen=True)
class Case:
    pruner: dict[str, Any]
    plain_pruner: Callable[[int], optuna.pruners.BasePruner]
    sampler: str = "tpe"
    objective: str = "val_loss"
    epochs: int = 4


CASES = {
    "median": Case(
        {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1, "cycle_aware": False},
        lambda _epochs: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    ),
    "median-random-maximize": Case(
        {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0, "cycle_aware": False},
        lambda _epochs: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        sampler="random", objective="val_accuracy",
    ),
    "percentile": Case(
        {"name": "percentile", "percentile": 25.0, "n_startup_trials": 2,
         "n_warmup_steps": 0, "cycle_aware": False},
        lambda _epochs: optuna.pruners.PercentilePruner(25.0, n_startup_trials=2,
                                                        n_warmup_steps=0),
    ),
    "successive-halving": Case(
        {"name": "successive_halving", "reduction_factor": 2, "cycle_aware": False},
        lambda _epochs: optuna.pruners.SuccessiveHalvingPruner(min_resource=1,
                                                               reduction_factor=2),
    ),
    "hyperband-maximize": Case(
        {"name": "hyperband", "reduction_factor": 2, "cycle_aware": False},
        lambda epochs: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs,
                                                      reduction_factor=2),
        objective="val_accuracy",
    ),
    # Our own pruner, shown only the epochs that end a cycle: the plain side filters the
    # reports as the documentation of cycle-aware pruning says, with the same functions.
    "cycle-aware-median": Case(
        {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0, "cycle_aware": True},
        lambda _epochs: CycleEndPercentilePruner(50.0, n_startup_trials=2, n_warmup_steps=0),
        epochs=8,
    ),
}


def objective_values(number: int, epochs: int, objective: str) -> list[float]:
    losses = [BASES[number] + SLOPES[number] / epoch for epoch in range(1, epochs + 1)]
    if objective == "val_loss":
        return losses
    return [1.0 / (1.0 + loss) for loss in losses]


class PlainOptuna:
    """Optuna in memory, driven by hand the way its documentation shows."""

    def __init__(self, case: Case) -> None:
        sampler = (optuna.samplers.RandomSampler(seed=SEED) if case.sampler == "random"
                   else optuna.samplers.TPESampler(seed=SEED))
        self.case = case
        self.study = optuna.create_study(
            study_name=STUDY, sampler=sampler, pruner=case.plain_pruner(case.epochs),
            direction="minimize" if case.objective == "val_loss" else "maximize",
        )
        self.params: dict[int, dict[str, float]] = {}

    def ask(self, fixed: dict[str, float] | None = None) -> optuna.Trial:
        if fixed is not None:
            self.study.enqueue_trial(fixed)  # the settings the server's trial got
        trial = self.study.ask()
        max_lr = trial.suggest_float("max_lr", 0.01, 0.5, log=True)
        lr_ratio = trial.suggest_float("lr_ratio", 3.0, 10.0, log=True)
        step_size_up = trial.suggest_float("step_size_up", 1.0, 4.0)
        self.params[trial.number] = {
            "max_lr": max_lr, "base_lr": max_lr / lr_ratio, "step_size_up": step_size_up,
        }
        return trial

    def report(self, trial: optuna.Trial, epoch: int, value: float) -> str:
        if self.case.pruner["cycle_aware"]:
            params = CyclicParams(**self.params[trial.number])
            if epoch not in cycle_end_epochs(params, BATCHES_PER_EPOCH, self.case.epochs):
                return "continue"
        trial.report(value, epoch)
        # The server's documented rule: pruning at the last epoch saves nothing, so the
        # pruner is not asked there.
        if epoch < self.case.epochs and trial.should_prune():
            self.study.tell(trial, state=TrialState.PRUNED)
            return "prune"
        return "continue"

    def complete(self, trial: optuna.Trial, value: float) -> None:
        self.study.tell(trial, value)


class ServerWorkers:
    """Two workers speaking the worker protocol to the server, as `worker.loop` does."""

    def __init__(self, client: TestClient, objective: str) -> None:
        self.client = client
        self.objective = objective

    def claim(self, worker_id: str) -> dict[str, Any]:
        response = self.client.post(f"{WORKER}/claim", json={"worker_id": worker_id})
        assert response.status_code == 200, response.text
        trial = response.json()["trial"]
        assert trial is not None
        return trial

    def report(self, trial: dict[str, Any], epoch: int, value: float) -> str:
        first = self._report(trial, epoch, value)
        # A repeat after a lost answer, with a value that must not be recorded.
        again = self._report(trial, epoch, value / 2)
        assert again == first
        return first

    def complete(self, trial: dict[str, Any], value: float, pruned: bool) -> None:
        response = self.client.post(
            f"{WORKER}/trials/{trial['trial_id']}/complete",
            json={"lease_id": trial["lease_id"], "value": value, "pruned": pruned},
        )
        assert response.status_code == 200, response.text

    def _report(self, trial: dict[str, Any], epoch: int, value: float) -> str:
        is_loss = self.objective == "val_loss"
        response = self.client.post(f"{WORKER}/trials/{trial['trial_id']}/report", json={
            "lease_id": trial["lease_id"], "epoch": epoch,
            "iterations": epoch * BATCHES_PER_EPOCH, "train_loss": 1.0,
            "val_loss": value if is_loss else 1.0,
            "val_accuracy": 0.5 if is_loss else value,
            "duration_s": 0.1,
        })
        assert response.status_code == 200, response.text
        return response.json()["action"]


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    # Every claim samples for itself: the sampler sees exactly what plain Optuna's does.
    settings = ServerSettings(database_url=database_url, ask_ahead=False)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def ask_ahead_client(database_url: str) -> Iterator[TestClient]:
    settings = ServerSettings(database_url=database_url, ask_ahead=True)
    with TestClient(create_app(settings)) as client:
        yield client


def run_both(case: Case, workers: ServerWorkers, plain: PlainOptuna, database_url: str,
             follow_server: bool = False,
             ) -> tuple[list[tuple[int, int, str]], list[tuple[int, int, str]]]:
    """The same scenario through the server and through plain Optuna: the decisions.
    With `follow_server`, plain Optuna's trials get the settings the server's got."""
    decisions: dict[str, list[tuple[int, int, str]]] = {"server": [], "plain": []}
    for first in range(0, N_TRIALS, 2):
        numbers = [first, first + 1]
        served = {number: workers.claim(f"w{number % 2}") for number in numbers}
        fixed = ({t.number: t.params for t in stored_optuna_trials(database_url)}
                 if follow_server else {})
        asked = {number: plain.ask(fixed.get(number)) for number in numbers}
        assert [served[n]["number"] for n in numbers] == [asked[n].number for n in numbers]
        for number in numbers:
            params = served[number]["params"]
            assert {name: params[name] for name in plain.params[number]} == plain.params[number]

        values = {n: objective_values(n, case.epochs, case.objective) for n in numbers}
        running = list(numbers)
        for epoch in range(1, case.epochs + 1):
            for number in list(running):
                value = values[number][epoch - 1]
                server_action = workers.report(served[number], epoch, value)
                plain_action = plain.report(asked[number], epoch, value)
                decisions["server"].append((number, epoch, server_action))
                decisions["plain"].append((number, epoch, plain_action))
                if server_action != "continue" or plain_action != "continue":
                    running.remove(number)
                    # The worker completes a pruned trial too; the server keeps its state.
                    workers.complete(served[number], value, pruned=True)
        for number in running:
            workers.complete(served[number], values[number][-1], pruned=False)
            plain.complete(asked[number], values[number][-1])
    return decisions["server"], decisions["plain"]


def stored_optuna_trials(database_url: str) -> list[optuna.trial.FrozenTrial]:
    with optuna_storage(database_url) as storage:
        return optuna.load_study(study_name=STUDY, storage=storage).get_trials()


@pytest.mark.parametrize("case_name", list(CASES))
def test_server_prunes_and_stores_what_plain_optuna_would(
    case_name: str, client: TestClient, database_url: str
) -> None:
    case = CASES[case_name]
    response = client.post("/api/v1/studies", json={
        "name": STUDY, "n_trials": N_TRIALS, "parallelism": 2, "sampler": case.sampler,
        "sampler_seed": SEED, "pruner": case.pruner, "objective": case.objective,
        "task": {"epochs": case.epochs},
    })
    assert response.status_code == 201, response.text
    plain = PlainOptuna(case)

    server_decisions, plain_decisions = run_both(case, ServerWorkers(client, case.objective),
                                                 plain, database_url)
    assert_same_search(case, client, database_url, plain, server_decisions, plain_decisions)


@pytest.mark.parametrize("case_name", ["median", "hyperband-maximize"])
def test_with_ask_ahead_the_server_prunes_and_stores_what_plain_optuna_would(
    case_name: str, ask_ahead_client: TestClient, database_url: str
) -> None:
    """Ask-ahead drafts trials in another process and changes which settings they get,
    not what is done with their reports: given the server's settings, plain Optuna
    prunes and stores the same."""
    case, client = CASES[case_name], ask_ahead_client
    response = client.post("/api/v1/studies", json={
        "name": STUDY, "n_trials": N_TRIALS, "parallelism": 2, "sampler": case.sampler,
        "sampler_seed": SEED, "pruner": case.pruner, "objective": case.objective,
        "task": {"epochs": case.epochs},
    })
    assert response.status_code == 201, response.text
    # The study's creation asked for its first draft; claims wait for drafts once the
    # proposer process answers.
    assert client.app.state.bridge.ask_ahead.wait_until_answering(60)
    plain = PlainOptuna(case)

    server_decisions, plain_decisions = run_both(case, ServerWorkers(client, case.objective),
                                                 plain, database_url, follow_server=True)
    assert_same_search(case, client, database_url, plain, server_decisions, plain_decisions)
    assert client.app.state.bridge.drafted_claims > 0, "no claim was served from a draft"


def assert_same_search(case: Case, client: TestClient, database_url: str, plain: PlainOptuna,
                       server_decisions: list, plain_decisions: list) -> None:
    assert server_decisions == plain_decisions
    assert any(action == "prune" for _, _, action in plain_decisions), "nothing was pruned"
    expected = plain.study.get_trials()
    trials = client.get(f"/api/v1/studies/{STUDY}/trials", params={"limit": 100}).json()
    assert [(t["number"], t["state"], t["value"]) for t in trials["trials"]] == [
        (t.number, t.state.name.lower(), t.value) for t in expected
    ]
    for trial in expected:
        detail = client.get(f"/api/v1/studies/{STUDY}/trials/{trial.number}").json()
        recorded = [epoch[case.objective] for epoch in detail["epochs"]]
        assert recorded == objective_values(trial.number, case.epochs,
                                            case.objective)[: len(recorded)]
    assert client.get(f"/api/v1/studies/{STUDY}").json()["state"] == "complete"

    stored = stored_optuna_trials(database_url)
    assert [(t.number, t.state, t.value, t.intermediate_values, t.params) for t in stored] == [
        (t.number, t.state, t.value, t.intermediate_values, t.params) for t in expected
    ]
