"""The REST API and the worker protocol, in process, on SQLite and on real PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServerSettings

WORKER = "/api/v1/worker"


def make_client(database_url: str, **settings: Any) -> TestClient:
    return TestClient(create_app(ServerSettings(database_url=database_url, **settings)))


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    with make_client(database_url) as client:
        yield client


def submit(client: TestClient, **spec: Any) -> dict[str, Any]:
    response = client.post("/api/v1/studies", json={"name": "s", **spec})
    assert response.status_code == 201, response.text
    return response.json()


def claim(client: TestClient, worker_id: str = "w1") -> dict[str, Any] | None:
    response = client.post(f"{WORKER}/claim", json={"worker_id": worker_id, "device": "cpu"})
    assert response.status_code == 200, response.text
    return response.json()["trial"]


def epoch_body(trial: dict[str, Any], epoch: int, val_loss: float) -> dict[str, Any]:
    return {
        "lease_id": trial["lease_id"], "epoch": epoch, "iterations": 10 * epoch,
        "train_loss": val_loss, "val_loss": val_loss, "val_accuracy": 0.5,
        "duration_s": 0.1, "lrs": [0.01 * i for i in range(10)], "momentums": [0.9] * 10,
    }


def report(client: TestClient, trial: dict[str, Any], epoch: int, val_loss: float):
    return client.post(f"{WORKER}/trials/{trial['trial_id']}/report",
                       json=epoch_body(trial, epoch, val_loss))


def complete(client: TestClient, trial: dict[str, Any], value: float):
    return client.post(f"{WORKER}/trials/{trial['trial_id']}/complete",
                       json={"lease_id": trial["lease_id"], "value": value})


def test_minimal_spec_gets_every_default_filled_in(client: TestClient) -> None:
    study = submit(client)

    assert study["state"] == "running"
    assert study["n_trials"] == 20
    assert study["spec"]["task"]["dataset"] == "digits"
    assert study["spec"]["space"]["lr_ratio"] == {"low": 3.0, "high": 10.0, "log": True}
    assert client.get("/api/v1/studies").json()[0]["name"] == "s"


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"name": "s", "colour": "red"}, "colour", "Extra inputs"),
        ({"name": "s", "space": {"base_lr": 0.5, "max_lr": 0.1}}, "space", "below max_lr"),
        ({"name": "s", "n_trials": -1}, "n_trials", "greater than or equal to 0"),
        ({"name": "s", "n_trials": 0}, "body", "n_trials must be at least 1"),
        ({"name": "s", "task": {"model": "vgg99"}}, "task.model", "unknown model 'vgg99'"),
        ({"name": "s", "task": {"dataset": "imagenet"}}, "task.dataset", "digits"),
        ({"name": "s", "space": {"gamma": 0.99}}, "space", "gamma only applies"),
        ({"name": "has space"}, "name", "letters, digits"),
        ({}, "name", "Field required"),
    ],
)
def test_bad_spec_is_refused_with_422_naming_the_field(
    client: TestClient, spec: dict[str, Any], field: str, words: str
) -> None:
    response = client.post("/api/v1/studies", json=spec)

    assert response.status_code == 422
    body = response.json()
    assert any(error["field"] == field for error in body["errors"]), body
    assert words in body["detail"]


def test_malformed_json_is_a_422_not_a_500(client: TestClient) -> None:
    response = client.post("/api/v1/studies", content=b"{not json",
                           headers={"Content-Type": "application/json"})

    assert response.status_code == 422


def test_duplicate_study_name_is_a_409(client: TestClient) -> None:
    submit(client)

    response = client.post("/api/v1/studies", json={"name": "s"})

    assert response.status_code == 409
    assert "already exists" in response.json()["detail"]


def test_unknown_study_and_trial_are_404_with_a_message(client: TestClient) -> None:
    assert client.get("/api/v1/studies/nope").status_code == 404
    submit(client)
    response = client.get("/api/v1/studies/s/trials/7")
    assert response.status_code == 404
    assert "no trial number 7" in response.json()["detail"]
    assert client.get("/api/v1/studies/s/best").status_code == 404


def test_full_trial_cycle_records_curve_lr_trace_and_best(client: TestClient) -> None:
    submit(client, n_trials=1, pruner="none")
    trial = claim(client)
    assert trial["params"]["max_lr"] > trial["params"]["base_lr"]

    for epoch in (1, 2):
        assert report(client, trial, epoch, 1.0 / epoch).json()["action"] == "continue"
    assert complete(client, trial, 0.5).json() == {"recorded": True, "state": "complete"}

    detail = client.get("/api/v1/studies/s/trials/0").json()
    assert [epoch["val_loss"] for epoch in detail["epochs"]] == [1.0, 0.5]
    assert detail["lr_trace"]["total_steps"] == 20
    assert client.get("/api/v1/studies/s/best").json()["value"] == 0.5
    study = client.get("/api/v1/studies/s").json()
    assert study["state"] == "complete"
    assert study["best_trial"]["number"] == 0


def test_long_lr_trace_is_thinned_to_max_points_keeping_the_ends(client: TestClient) -> None:
    submit(client, n_trials=1)
    trial = claim(client)
    body = epoch_body(trial, 1, 1.0)
    body["lrs"] = [float(i) for i in range(5000)]
    body["momentums"] = [0.9] * 5000
    client.post(f"{WORKER}/trials/{trial['trial_id']}/report", json=body)

    trace = client.get("/api/v1/studies/s/trials/0", params={"max_points": 100}).json()

    assert trace["lr_trace"]["total_steps"] == 5000
    assert len(trace["lr_trace"]["lr"]) == 100
    assert trace["lr_trace"]["lr"][0] == 0.0 and trace["lr_trace"]["lr"][-1] == 4999.0


def test_repeated_report_and_complete_record_nothing_twice(client: TestClient) -> None:
    submit(client, n_trials=1)
    trial = claim(client)

    first = report(client, trial, 1, 0.7).json()
    again = report(client, trial, 1, 0.1).json()
    complete(client, trial, 0.7)
    repeat = complete(client, trial, 0.1)

    assert again["action"] == first["action"]
    assert repeat.json() == {"recorded": True, "state": "complete"}
    detail = client.get("/api/v1/studies/s/trials/0").json()
    assert [epoch["val_loss"] for epoch in detail["epochs"]] == [0.7]
    assert detail["value"] == 0.7


def complete_and_claim(client: TestClient, trial: dict[str, Any], value: float,
                       worker_id: str = "w1", lease_id: str | None = None):
    return client.post(f"{WORKER}/trials/{trial['trial_id']}/complete", json={
        "lease_id": lease_id or trial["lease_id"], "value": value,
        "claim_next": {"worker_id": worker_id, "device": "cpu"},
    })


def test_completion_carrying_the_next_claim_records_first_then_claims(
    client: TestClient,
) -> None:
    submit(client, n_trials=2)
    first = claim(client)
    report(client, first, 1, 0.4)

    answer = complete_and_claim(client, first, 0.4).json()
    # The answer to a lost reply, asked again: the same completion, the trial it gave.
    again = complete_and_claim(client, first, 0.4).json()
    plain = complete(client, first, 0.4).json()

    assert answer["recorded"] is True and answer["state"] == "complete"
    second = answer["next"]["trial"]
    assert second["number"] == 1 and second["trial_id"] != first["trial_id"]
    assert again["next"]["trial"] == second
    assert plain == {"recorded": True, "state": "complete"}  # no claim, no "next"
    study = client.get("/api/v1/studies/s").json()
    assert study["counts"]["complete"] == 1 and study["counts"]["running"] == 1
    # With the budget spent, the claim that goes with the last completion gets nothing.
    complete(client, second, 0.2)
    assert complete_and_claim(client, second, 0.2).json()["next"]["trial"] is None


def test_refused_completion_claims_nothing(client: TestClient) -> None:
    submit(client, n_trials=3)
    trial = claim(client)

    refused = complete_and_claim(client, trial, 0.4, lease_id="forged")

    assert refused.status_code == 409
    assert client.get("/api/v1/studies/s").json()["counts"]["running"] == 1


def test_parallelism_and_trial_budget_are_never_exceeded(client: TestClient) -> None:
    submit(client, n_trials=3, parallelism=2)

    first, second, third = (claim(client, f"w{i}") for i in range(3))
    assert first and second and third is None
    complete(client, first, 0.3)
    fourth = claim(client, "w4")
    complete(client, second, 0.2)
    complete(client, fourth, 0.1)

    assert claim(client, "w5") is None
    counts = client.get("/api/v1/studies/s").json()["counts"]
    assert counts["complete"] == 3


def test_restarted_worker_gets_back_the_trial_it_held(client: TestClient) -> None:
    submit(client, n_trials=2)
    held = claim(client, "gpu-0")

    again = claim(client, "gpu-0")

    assert again["trial_id"] == held["trial_id"]
    assert again["lease_id"] == held["lease_id"]


def test_workers_are_recorded_with_the_trial_each_holds(client: TestClient) -> None:
    submit(client, n_trials=1)

    def claim_from(worker_id: str, host: str, device: str) -> dict[str, Any] | None:
        response = client.post(f"{WORKER}/claim", json={
            "worker_id": worker_id, "host": host, "device": device})
        assert response.status_code == 200, response.text
        return response.json()["trial"]

    def workers() -> dict[str, dict[str, Any]]:
        return {worker["id"]: worker for worker in client.get("/api/v1/workers").json()}

    trial = claim_from("gpu-0", "box-a", "cuda:0")
    assert claim_from("gpu-1", "box-a", "cuda:1") is None  # the study's one trial is taken
    seen = workers()
    assert {key: seen["gpu-0"][key] for key in ("host", "device", "trial_id")} == {
        "host": "box-a", "device": "cuda:0", "trial_id": trial["trial_id"]}
    assert seen["gpu-1"]["trial_id"] is None

    assert complete(client, trial, 0.5).json()["state"] == "complete"
    assert claim_from("gpu-0", "box-b", "cuda:3") is None  # moved, nothing left to run
    after = workers()
    assert len(after) == 2
    assert {key: after["gpu-0"][key] for key in ("host", "device", "trial_id")} == {
        "host": "box-b", "device": "cuda:3", "trial_id": None}
    assert after["gpu-0"]["last_seen_at"] > seen["gpu-0"]["last_seen_at"]


def test_median_pruner_prunes_a_trial_worse_than_the_others(client: TestClient) -> None:
    pruner = {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0,
              "cycle_aware": False}
    submit(client, n_trials=3, parallelism=1, pruner=pruner)
    for value in (0.2, 0.3):
        trial = claim(client)
        report(client, trial, 1, value)
        complete(client, trial, value)

    bad = claim(client)
    decision = report(client, bad, 1, 5.0).json()

    assert decision["action"] == "prune"
    assert "median pruner" in decision["reason"]
    pruned = client.get("/api/v1/studies/s/trials/2").json()
    assert pruned["state"] == "pruned"
    assert complete(client, bad, 5.0).json()["state"] == "pruned"


def test_stopping_a_study_reaches_the_running_trial_at_its_next_call(
    client: TestClient,
) -> None:
    submit(client, n_trials=5)
    trial = claim(client)

    stopped = client.post("/api/v1/studies/s/stop").json()
    beat = client.post(f"{WORKER}/trials/{trial['trial_id']}/heartbeat",
                       json={"lease_id": trial["lease_id"]}).json()
    decision = report(client, trial, 1, 0.5).json()

    assert stopped["state"] == "stopped"
    assert beat["action"] == "stop"
    assert decision["action"] == "stop"
    assert client.get("/api/v1/studies/s/trials/0").json()["state"] == "stopped"
    assert claim(client, "w2") is None


def test_lapsed_lease_requeues_the_trial_with_the_same_parameters(database_url: str) -> None:
    with make_client(database_url, lease_s=0.3) as client:
        submit(client, n_trials=1, max_retries=1)
        lost = claim(client, "dies")
        time.sleep(0.5)

        retried = claim(client, "survives")
        late = report(client, lost, 1, 0.1)
        time.sleep(0.5)
        # This claim sweeps the second lapse; with no retries left nothing is offered.
        assert claim(client, "third") is None
        final = client.get("/api/v1/studies/s/trials/0").json()

    assert retried["trial_id"] == lost["trial_id"]
    assert retried["params"] == lost["params"]
    assert retried["attempt"] == 2
    assert late.status_code == 409
    assert "not leased to this worker" in late.json()["detail"]
    assert final["state"] == "failed"
    assert final["infra_losses"] == 2
    assert "gave up after 2 infrastructure losses (max_retries=1)" in final["error"]


def test_retryable_failure_requeues_and_plain_failure_is_final(client: TestClient) -> None:
    submit(client, n_trials=2, parallelism=1)
    trial = claim(client)
    handed_back = client.post(f"{WORKER}/trials/{trial['trial_id']}/fail",
                              json={"lease_id": trial["lease_id"], "error": "SIGTERM",
                                    "retryable": True}).json()
    again = claim(client)
    failed = client.post(f"{WORKER}/trials/{again['trial_id']}/fail",
                         json={"lease_id": again["lease_id"], "error": "Traceback: boom"}).json()

    assert handed_back["state"] == "queued"
    assert again["trial_id"] == trial["trial_id"]
    assert failed["state"] == "failed"
    assert client.get("/api/v1/studies/s/trials/0").json()["error"] == "Traceback: boom"


def test_trials_are_paged_and_filtered_by_state(client: TestClient) -> None:
    submit(client, n_trials=5, parallelism=5)
    trials = [claim(client, f"w{i}") for i in range(5)]
    for trial in trials[:3]:
        complete(client, trial, 0.1)

    page = client.get("/api/v1/studies/s/trials", params={"limit": 2, "offset": 1}).json()
    running = client.get("/api/v1/studies/s/trials", params={"state": "running"}).json()
    bad = client.get("/api/v1/studies/s/trials", params={"state": "sleeping"})

    assert page["total"] == 5 and [t["number"] for t in page["trials"]] == [1, 2]
    assert running["total"] == 2
    assert bad.status_code == 422


def test_worker_protocol_rejects_a_lease_it_never_gave(client: TestClient) -> None:
    submit(client, n_trials=1)
    trial = claim(client)
    trial["lease_id"] = "forged"

    assert report(client, trial, 1, 0.2).status_code == 409
    assert client.post(f"{WORKER}/trials/999/report",
                       json=epoch_body(trial, 1, 0.2)).status_code == 404


def test_non_finite_losses_are_refused(client: TestClient) -> None:
    submit(client, n_trials=1)
    trial = claim(client)
    body = epoch_body(trial, 1, float("nan"))
    raw = client.post(f"{WORKER}/trials/{trial['trial_id']}/report",
                      content=json.dumps(body), headers={"Content-Type": "application/json"})

    assert raw.status_code == 422


def test_tokens_guard_admin_and_worker_routes(sqlite_url: str) -> None:
    with make_client(sqlite_url, admin_token="adm", worker_token="wrk") as client:
        no_token = client.post("/api/v1/studies", json={"name": "s"})
        worker_on_admin = client.post("/api/v1/studies", json={"name": "s"},
                                      headers={"Authorization": "Bearer wrk"})
        admin = client.post("/api/v1/studies", json={"name": "s"},
                            headers={"Authorization": "Bearer adm"})
        claim_without = client.post(f"{WORKER}/claim", json={"worker_id": "w"})
        claim_with = client.post(f"{WORKER}/claim", json={"worker_id": "w"},
                                 headers={"Authorization": "Bearer wrk"})
        reads = client.get("/api/v1/studies")

    assert no_token.status_code == 401
    assert worker_on_admin.status_code == 403
    assert admin.status_code == 201
    assert claim_without.status_code == 401
    assert claim_with.status_code == 200
    assert reads.status_code == 200  # reads stay open unless a read token is set


def test_healthz_and_openapi_docs_are_served(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert "/api/v1/studies" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_training_errors_beyond_max_failed_trials_stop_the_study_saying_why(
    client: TestClient,
) -> None:
    submit(client, n_trials=10, parallelism=1, max_failed_trials=1)
    for _ in range(2):
        trial = claim(client)
        client.post(f"{WORKER}/trials/{trial['trial_id']}/fail",
                    json={"lease_id": trial["lease_id"], "error": "Traceback\nValueError: bad"})

    study = client.get("/api/v1/studies/s").json()

    assert study["state"] == "stopped"
    assert "2 trials failed, more than max_failed_trials=1" in study["stop_reason"]
    assert "ValueError: bad" in study["stop_reason"]
    assert claim(client) is None


def test_infrastructure_losses_are_counted_apart_from_training_errors(
    client: TestClient,
) -> None:
    submit(client, n_trials=1, max_retries=3)
    for _ in range(2):
        trial = claim(client)
        client.post(f"{WORKER}/trials/{trial['trial_id']}/fail",
                    json={"lease_id": trial["lease_id"], "error": "SIGTERM", "retryable": True})
    trial = claim(client)
    complete(client, trial, 0.4)

    final = client.get("/api/v1/studies/s/trials/0").json()

    assert (final["state"], final["attempts"], final["infra_losses"]) == ("complete", 3, 2)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/api/v1/studies/s/trials/99999999999", None),
        ("post", f"{WORKER}/trials/99999999999/heartbeat", {"lease_id": "x"}),
        ("post", f"{WORKER}/claim", {"worker_id": "nul\u0000byte"}),
        ("get", "/api/v1/studies/s/trials", None),
    ],
)
def test_values_the_database_cannot_hold_are_4xx_not_500(
    client: TestClient, method: str, path: str, body: dict | None
) -> None:
    submit(client)
    params = {"offset": 2**40} if path.endswith("/trials") else None
    response = client.request(method.upper(), path, json=body, params=params)

    assert 400 <= response.status_code < 500, response.text


def test_cycle_aware_pruner_judges_a_trial_only_at_the_end_of_a_cycle(
    client: TestClient,
) -> None:
    # Cycles of 2 + 2 epochs of 10 iterations: epochs 4 and 8 end cycles.
    space = {"step_size_up": {"low": 1.99, "high": 2.01}, "step_size_down": 2.0}
    pruner = {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0}
    submit(client, n_trials=3, parallelism=1, pruner=pruner, space=space)
    for value in (0.2, 0.3):
        trial = claim(client)
        for epoch in range(1, 5):
            report(client, trial, epoch, value)
        complete(client, trial, value)

    bad = claim(client)
    mid_cycle = [report(client, bad, epoch, 9.0).json()["action"] for epoch in (1, 2, 3)]
    at_cycle_end = report(client, bad, 4, 9.0).json()

    assert mid_cycle == ["continue"] * 3
    assert at_cycle_end["action"] == "prune"


def test_the_last_epoch_is_never_pruned(client: TestClient) -> None:
    pruner = {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0,
              "cycle_aware": False}
    submit(client, n_trials=2, parallelism=1, pruner=pruner, task={"epochs": 2})
    good = claim(client)
    report(client, good, 1, 0.1)
    report(client, good, 2, 0.1)
    complete(client, good, 0.1)

    late_bloomer = claim(client)
    first = report(client, late_bloomer, 1, 0.05).json()["action"]
    last = report(client, late_bloomer, 2, 9.0).json()["action"]
    finished = complete(client, late_bloomer, 9.0).json()

    # The same worse-than-median value at epoch 1 would have been pruned.
    assert (first, last, finished["state"]) == ("continue", "continue", "complete")


def test_holder_of_a_lapsed_lease_is_taken_back_while_nobody_else_claimed(
    database_url: str,
) -> None:
    with make_client(database_url, lease_s=0.3, sweep_interval_s=0.1) as client:
        submit(client, n_trials=1, parallelism=1)
        cut_off = claim(client, "far-away")
        time.sleep(1.0)  # the sweeper finds the lapse and queues the trial again
        queued = client.get("/api/v1/studies/s/trials/0").json()
        late_report = report(client, cut_off, 1, 0.3)
        late_complete = complete(client, cut_off, 0.3)
        final = client.get("/api/v1/studies/s/trials/0").json()

    assert queued["state"] == "queued"
    assert late_report.status_code == 200, late_report.text
    assert late_complete.json() == {"recorded": True, "state": "complete"}
    assert final["value"] == 0.3 and final["infra_losses"] == 1


@pytest.mark.postgres
def test_a_stopped_server_leaves_no_connection_open_even_mid_sweep(postgres_url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    database = make_url(postgres_url).database
    for round_ in range(5):  # sweeps every 5 ms: most stops fall on one in progress
        with make_client(postgres_url, sweep_interval_s=0.005) as client:
            client.post("/api/v1/studies", json={"name": f"s{round_}", "n_trials": 1})
            time.sleep(0.05)
    admin = create_engine(make_url(postgres_url).set(database="postgres"))
    with admin.connect() as connection:
        still_open = connection.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE datname = :name"),
            {"name": database},
        ).scalar_one()
    admin.dispose()
    assert still_open == 0
