"""The dashboard's pages and JSON, in process, on SQLite and on real PostgreSQL.

What a browser does with them is in tests/browser; here are the answers themselves:
server-side sorting (JSON fields and durations differ by dialect), caps and thinning,
exports, lease health, tokens, and that nothing is fetched from outside the server.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.app import create_app
from service.db import db_now, unit_of_work
from service.models import Trial
from service.settings import ServerSettings
from tests.browser.protocol import STEPS_PER_EPOCH, FakeWorkers, add_baseline_run

API = "/dashboard/api/studies"


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    """On SQLite and on PostgreSQL: for what runs dialect-specific SQL (sorting on JSON
    fields and durations, date arithmetic) or reads several tables at once."""
    with TestClient(create_app(ServerSettings(database_url=database_url))) as client:
        yield client


@pytest.fixture
def sqlite_client(sqlite_url: str) -> Iterator[TestClient]:
    """On SQLite only: for what does not depend on the database."""
    with TestClient(create_app(ServerSettings(database_url=sqlite_url))) as client:
        yield client


def run_study(client: TestClient, name: str = "s", finals: tuple[float, ...] = (0.3, 0.5, 0.2),
              running: int = 1, epochs: int = 3, **spec: Any) -> list[dict[str, Any]]:
    """Complete a trial per value in `finals`, then leave `running` trials running."""
    workers = FakeWorkers(client)
    count = len(finals) + running
    workers.submit(name, n_trials=count, parallelism=count, pruner="none",
                   task={"epochs": epochs}, **spec)
    trials = [workers.claim(f"{name}-w{i}", name) for i in range(count)]
    for trial, final in zip(trials, finals, strict=False):
        for epoch in range(1, epochs + 1):
            workers.report(trial, epoch, final + 0.1 * (epochs - epoch))
        workers.complete(trial, final)
    for trial in trials[len(finals):]:
        workers.report(trial, 1, 0.9)
    return trials


def test_study_page_embeds_its_header_and_first_table_page(sqlite_client: TestClient) -> None:
    run_study(sqlite_client)

    page = sqlite_client.get("/dashboard/studies/s", params={"page_size": 2})
    embedded = re.search(r'id="initial-data">(.*?)</script>', page.text, re.S)

    assert page.status_code == 200
    assert embedded is not None
    initial = json.loads(embedded.group(1))
    assert initial["live"]["study"]["counts"]["complete"] == 3
    assert initial["live"]["param_columns"] == ["base_lr", "max_lr", "step_size_up"]
    assert initial["live"]["fixed_params"]["step_size_down"] == "same as step_size_up"
    assert initial["table"]["total"] == 4 and len(initial["table"]["trials"]) == 2


def test_trials_sort_by_value_parameter_and_duration_with_empty_values_last(
    client: TestClient,
) -> None:
    trials = run_study(client, running=2)

    def numbers(sort: str, order: str) -> list[int]:
        page = client.get(f"{API}/s/trials", params={"sort": sort, "order": order}).json()
        return [row["number"] for row in page["trials"]]

    by_max_lr = sorted(trials, key=lambda trial: trial["params"]["max_lr"])
    assert numbers("value", "asc")[:3] == [trials[2]["number"], trials[0]["number"],
                                           trials[1]["number"]]
    assert numbers("value", "desc")[:3] == [trials[1]["number"], trials[0]["number"],
                                            trials[2]["number"]]
    assert numbers("params.max_lr", "asc") == [trial["number"] for trial in by_max_lr]
    assert numbers("params.max_lr", "desc") == [trial["number"] for trial in by_max_lr][::-1]
    durations = client.get(f"{API}/s/trials", params={"sort": "duration"}).json()["trials"]
    assert all(row["duration_s"] is not None and row["duration_s"] >= 0 for row in durations)
    assert [row["duration_s"] for row in durations] == sorted(
        (row["duration_s"] for row in durations), reverse=True)


def test_an_unknown_sort_column_is_a_422_that_lists_the_columns(sqlite_client: TestClient) -> None:
    run_study(sqlite_client, finals=(), running=1)

    response = sqlite_client.get(f"{API}/s/trials", params={"sort": "colour"})

    assert response.status_code == 422
    assert "params.max_lr" in response.json()["detail"]


def test_an_unknown_study_is_a_404_page_and_a_404_answer(sqlite_client: TestClient) -> None:
    page = sqlite_client.get("/dashboard/studies/nope")

    assert page.status_code == 404
    assert "no study named &#39;nope&#39;" in page.text
    assert sqlite_client.get(f"{API}/nope/history").status_code == 404


def test_history_gives_each_complete_value_and_the_best_so_far(client: TestClient) -> None:
    trials = run_study(client)

    history = client.get(f"{API}/s/history").json()

    assert history["numbers"] == [trial["number"] for trial in trials[:3]]
    assert history["values"] == [0.3, 0.5, 0.2]
    assert history["best_so_far"] == [0.3, 0.3, 0.2]


def test_curves_beyond_the_cap_keep_the_best_and_the_running_trials(
    client: TestClient,
) -> None:
    trials = run_study(client, finals=(0.2, 0.5, 0.4, 0.3), running=1)

    curves = client.get(f"{API}/s/curves", params={"max_trials": 3}).json()

    shown = {curve["number"] for curve in curves["curves"]}
    assert curves["total_trials"] == 5 and len(shown) == 3
    assert trials[0]["number"] in shown  # the best
    assert trials[4]["number"] in shown  # running
    assert curves["epochs"] == [1, 2, 3]


def test_lr_schedules_of_the_best_trials_are_thinned_on_the_server(client: TestClient) -> None:
    trials = run_study(client, epochs=5)

    schedules = client.get(f"{API}/s/schedules", params={"top": 2, "max_points": 30}).json()

    assert [item["number"] for item in schedules["schedules"]] == [trials[2]["number"],
                                                                   trials[0]["number"]]
    assert len(schedules["iterations"]) == 30
    assert schedules["iterations"][0] == 0
    assert schedules["iterations"][-1] == 5 * STEPS_PER_EPOCH - 1
    assert all(item["total_steps"] == 5 * STEPS_PER_EPOCH for item in schedules["schedules"])
    assert all(len(item["lr"]) == 30 for item in schedules["schedules"])


def test_parallel_coordinates_use_log_axes_for_learning_rates(sqlite_client: TestClient) -> None:
    run_study(sqlite_client, space={"mode": ["triangular", "exp_range"]})

    parallel = sqlite_client.get(f"{API}/s/parallel").json()

    axes = {axis["name"]: axis for axis in parallel["axes"]}
    assert axes["base_lr"]["log"] and axes["max_lr"]["log"]
    assert not axes["step_size_up"]["log"]
    assert axes["mode"]["kind"] == "choice"
    assert axes["mode"]["categories"] == ["triangular", "exp_range"]
    assert len(parallel["lines"]) == 3


def test_importances_come_from_optuna_and_are_reused_until_a_trial_completes(
    sqlite_client: TestClient,
) -> None:
    trials = run_study(sqlite_client, finals=(0.3, 0.5, 0.2, 0.6), running=1)
    bridge = sqlite_client.app.state.bridge
    calls: list[str] = []
    real = bridge.importances
    bridge.importances = lambda spec: calls.append(spec.name) or real(spec)

    first = sqlite_client.get(f"{API}/s/importances").json()
    again = sqlite_client.get(f"{API}/s/importances").json()
    FakeWorkers(sqlite_client).complete(trials[4], 0.4)
    after = sqlite_client.get(f"{API}/s/importances").json()

    assert set(first["importances"]) <= {"max_lr", "lr_ratio", "step_size_up"}
    assert first["importances"] and first == again
    assert after["complete_trials"] == 5
    assert calls == ["s", "s"]


def test_comparison_is_null_until_a_baseline_run_exists(client: TestClient) -> None:
    trials = run_study(client)
    assert client.get(f"{API}/s/comparison").json() is None

    insert_baseline(client, "s", losses=(0.9, 0.7, 0.5))
    comparison = client.get(f"{API}/s/comparison").json()

    assert comparison["metric"] == "val_loss"
    assert comparison["cyclic"]["number"] == trials[2]["number"]
    assert comparison["cyclic"]["values"] == pytest.approx([0.4, 0.3, 0.2])
    assert comparison["baseline"]["params"] == {"schedule": "fixed", "lr": 0.05}
    assert comparison["baseline"]["values"] == [0.9, 0.7, 0.5]
    # A baseline is no CyclicLR trial: the search's own charts leave it out.
    assert len(client.get(f"{API}/s/history").json()["numbers"]) == 3
    assert client.get(f"{API}/s/curves").json()["total_trials"] == 4


def test_exports_hold_every_trial_with_its_parameters_in_columns(client: TestClient) -> None:
    trials = run_study(client)
    insert_baseline(client, "s", losses=(0.9,))

    exported_csv = client.get(f"{API}/s/export.csv")
    exported_json = client.get(f"{API}/s/export.json").json()

    rows = list(csv.DictReader(io.StringIO(exported_csv.text)))
    assert exported_csv.headers["content-type"].startswith("text/csv")
    assert "attachment" in exported_csv.headers["content-disposition"]
    assert len(rows) == len(trials) + 1 == len(exported_json["trials"])
    first = rows[0]
    assert float(first["params.max_lr"]) == pytest.approx(trials[0]["params"]["max_lr"])
    assert first["state"] == "complete" and float(first["value"]) == 0.3
    assert rows[-1]["kind"] == "baseline" and rows[-1]["params.lr"] == "0.05"
    assert exported_json["trials"][0]["params.mode"] == "triangular"


def test_worker_health_follows_the_renewal_of_its_lease(database_url: str) -> None:
    settings = ServerSettings(database_url=database_url, lease_s=60, heartbeat_s=5)
    with TestClient(create_app(settings)) as client:
        trials = run_study(client, finals=(0.3,), running=1)

        def health() -> dict[str, str]:
            return {worker["id"]: worker["health"]
                    for worker in client.get("/dashboard/api/workers").json()}

        fresh = health()
        set_lease_left(client, trials[1], seconds=40)  # renewed 20 s ago: 4 heartbeats
        late = health()
        set_lease_left(client, trials[1], seconds=-1)
        lapsed = health()
        holder = client.get("/dashboard/api/workers").json()[1]

    assert fresh == {"s-w0": "idle", "s-w1": "healthy"}
    assert late["s-w1"] == "late"
    assert lapsed["s-w1"] == "lapsed"
    assert holder["study_name"] == "s" and holder["trial_number"] == trials[1]["number"]


def test_a_read_token_guards_pages_and_data_but_not_static_files(sqlite_url: str) -> None:
    settings = ServerSettings(database_url=sqlite_url, read_token="reader", admin_token="adm")
    with TestClient(create_app(settings)) as client:
        no_token = client.get("/dashboard")
        wrong = client.get("/dashboard", headers={"Cookie": "clrsearch_token=guess"})
        by_cookie = client.get("/dashboard", headers={"Cookie": "clrsearch_token=reader"})
        data_no_token = client.get("/dashboard/api/workers")
        data_wrong = client.get("/dashboard/api/workers",
                                headers={"Authorization": "Bearer guess"})
        data_admin = client.get("/dashboard/api/workers",
                                headers={"Authorization": "Bearer adm"})
        script = client.get("/static/dashboard.js")

    assert no_token.status_code == 401 and "A token is needed" in no_token.text
    assert wrong.status_code == 403
    assert by_cookie.status_code == 200 and "Studies" in by_cookie.text
    assert data_no_token.status_code == 401
    assert data_wrong.status_code == 403
    assert data_admin.status_code == 200
    assert script.status_code == 200


def test_every_page_loads_scripts_and_styles_from_the_server_itself(sqlite_url: str) -> None:
    settings = ServerSettings(database_url=sqlite_url)
    with TestClient(create_app(settings)) as client:
        trials = run_study(client, finals=(0.3,), running=0)
        pages = [client.get(path).text for path in (
            "/dashboard", "/dashboard/workers", "/dashboard/studies/s",
            f"/dashboard/studies/s/trials/{trials[0]['number']}")]
        assets = {link for page in pages
                  for link in re.findall(r'(?:src|href)="([^"]+)"', page)}
        fetched = {asset: client.get(asset).status_code
                   for asset in assets if asset.startswith("/static/")}

    assert all(asset.startswith(("/", "data:")) for asset in assets), assets
    assert "/static/vendor/uPlot.iife.min.js" in fetched
    assert set(fetched.values()) == {200}


def insert_baseline(client: TestClient, study_name: str, losses: tuple[float, ...]) -> None:
    with unit_of_work(client.app.state.sessions) as session:
        add_baseline_run(session, study_name, losses, db_now(session))


def set_lease_left(client: TestClient, trial: dict[str, Any], seconds: float) -> None:
    with unit_of_work(client.app.state.sessions) as session:
        expires = db_now(session) + dt.timedelta(seconds=seconds)
        session.execute(update(Trial).where(Trial.id == trial["trial_id"])
                        .values(lease_expires_at=expires))
