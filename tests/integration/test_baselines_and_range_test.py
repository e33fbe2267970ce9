"""Baseline runs and the LR range test, through the worker protocol."""

from __future__ import annotations

import math

import optuna
import pytest
from fastapi.testclient import TestClient

from service.optuna_bridge import optuna_storage
from tests.integration.test_api import WORKER, claim, complete, make_client, report, submit


@pytest.fixture
def client(database_url: str):
    with make_client(database_url) as client:
        client.database_url = database_url  # type: ignore[attr-defined]
        yield client


def optuna_trial_count(database_url: str, study: str) -> int:
    with optuna_storage(database_url) as storage:
        return len(optuna.load_study(study_name=study, storage=storage).trials)


def test_baselines_run_first_and_never_reach_the_sampler(client: TestClient) -> None:
    spec = {"baselines": {"schedules": ["fixed", "onecycle"]}, "n_trials": 1,
            "pruner": {"name": "median", "n_startup_trials": 0, "n_warmup_steps": 0,
                       "cycle_aware": False}}
    submit(client, **spec)

    fixed, onecycle, cyclic = claim(client, "a"), claim(client, "b"), None
    assert (fixed["kind"], onecycle["kind"]) == ("baseline", "baseline")
    assert fixed["baseline"]["schedule"] == "fixed" and fixed["params"] is None
    # Centre of max_lr 0.01..0.5 is 0.0707; of the ratio 3..10 is 5.48: lr = 0.0302.
    assert fixed["baseline"]["lr"] == pytest.approx(math.sqrt(0.0707107 * 0.0707107 / 5.4772),
                                                    rel=1e-4)
    for trial, losses in ((fixed, (0.9, 0.5)), (onecycle, (0.8, 0.6))):
        for epoch, loss in enumerate(losses, start=1):
            assert report(client, trial, epoch, loss).json()["action"] == "continue"
        complete(client, trial, losses[-1])
    cyclic = claim(client, "c")
    for epoch, loss in enumerate((0.7, 0.45), start=1):
        report(client, cyclic, epoch, loss)
    complete(client, cyclic, 0.45)

    study = client.get("/api/v1/studies/s").json()
    assert cyclic["kind"] == "cyclic" and cyclic["number"] == 2
    assert optuna_trial_count(client.database_url, "s") == 1
    assert study["state"] == "complete"
    assert study["best_trial"]["number"] == 2
    comparison = study["baseline_comparison"]
    assert comparison["baseline_schedule"] == "fixed" and comparison["baseline_value"] == 0.5
    # The fixed baseline needed 20 iterations for 0.5; the cyclic trial beat it at 20 too.
    assert comparison["cyclic_iterations_to_reach"] == 20
    assert comparison["iteration_ratio"] == 1.0


def range_curve(minimum_at: float = 1.0) -> dict:
    lrs = [1e-5 * 10 ** (i / 20) for i in range(121)]  # 1e-5 .. 10
    losses = [2.0 / (1 + (lr / (minimum_at / 30)) ** 2) + 0.1 + (lr > minimum_at) * 5 * lr
              for lr in lrs]
    return {"lrs": lrs, "losses": losses, "diverged": True}


def test_range_test_runs_first_then_sets_the_lr_space_around_its_bounds(
    client: TestClient,
) -> None:
    submit(client, lr_bounds="auto", n_trials=2, baselines={"schedules": ["fixed"]})

    range_test = claim(client, "a")
    waiting = claim(client, "b")
    done = client.post(f"{WORKER}/trials/{range_test['trial_id']}/complete", json={
        "lease_id": range_test["lease_id"], "value": 0.0, "range_test": range_curve()})
    baseline = claim(client, "b")
    cyclic = claim(client, "c")

    assert range_test["kind"] == "range_test" and range_test["range_test"]["end_lr"] == 10.0
    assert waiting is None
    assert done.json()["state"] == "complete"
    detail = client.get(f"/api/v1/studies/s/trials/{range_test['number']}").json()
    suggested = detail["result"]["max_lr"]
    assert 0.01 < suggested <= 1.0 / 4
    space = client.get("/api/v1/studies/s").json()["spec"]["space"]
    assert space["max_lr"] == {"low": suggested / 2, "high": suggested * 2, "log": True}
    assert baseline["kind"] == "baseline"
    assert suggested / 2 <= cyclic["params"]["max_lr"] <= suggested * 2
    assert cyclic["params"]["base_lr"] < cyclic["params"]["max_lr"]


def test_a_flat_range_test_stops_the_study_and_says_why(client: TestClient) -> None:
    submit(client, lr_bounds="auto")
    range_test = claim(client)
    flat = {"lrs": [1e-5, 1e-3, 1e-1], "losses": [1.0, 1.0, 1.0]}

    client.post(f"{WORKER}/trials/{range_test['trial_id']}/complete",
                json={"lease_id": range_test["lease_id"], "value": 0, "range_test": flat})

    study = client.get("/api/v1/studies/s").json()
    assert study["state"] == "stopped"
    assert "loss never fell" in study["stop_reason"]


def test_a_range_test_on_its_own_reports_its_curve_and_bounds(client: TestClient) -> None:
    created = client.post("/api/v1/range-tests", json={"name": "rt", "task": {"model": "mlp"}})
    trial = claim(client)
    before = client.get("/api/v1/studies/rt/range-test").json()
    client.post(f"{WORKER}/trials/{trial['trial_id']}/complete", json={
        "lease_id": trial["lease_id"], "value": 0.0, "range_test": range_curve()})

    view = client.get("/api/v1/studies/rt/range-test", params={"max_points": 50}).json()
    study = client.get("/api/v1/studies/rt").json()

    assert created.status_code == 201 and trial["kind"] == "range_test"
    assert before["state"] == "running" and before["max_lr"] is None
    assert view["state"] == "complete" and len(view["lrs"]) == 50
    assert view["base_lr"] < view["max_lr"] < view["loss_minimum_lr"]
    assert study["state"] == "complete"
    assert client.get("/api/v1/studies/s/range-test").status_code == 404
