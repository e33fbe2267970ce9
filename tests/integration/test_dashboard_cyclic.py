"""The dashboard's cyclic-schedule answers, in process: the spec preview at the centre of
a space, the preview page, and the task the trial page predicts a schedule with.

None of these reads anything dialect-specific, so they run on SQLite only; what a browser
draws from them is in tests/browser/test_cyclic_pages.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServerSettings
from tests.browser.protocol import FakeWorkers

SPEC_PREVIEW = "/dashboard/api/preview/spec"


@pytest.fixture
def client(sqlite_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(ServerSettings(database_url=sqlite_url))) as client:
        yield client


def preview_spec(client: TestClient, **body: Any) -> Any:
    return client.post(SPEC_PREVIEW, json=body)


def test_a_spec_is_previewed_at_the_geometric_centre_of_its_ranges(client: TestClient) -> None:
    spec = {"name": "s", "space": {"max_lr": {"low": 0.01, "high": 1.0, "log": True},
                                   "lr_ratio": {"low": 4, "high": 16, "log": True},
                                   "step_size_up": {"low": 1, "high": 9},
                                   "mode": ["triangular2", "triangular"]},
            "task": {"epochs": 6}}

    answer = preview_spec(client, spec=spec, max_points=5000).json()

    params = answer["params"]
    assert params["max_lr"] == pytest.approx(0.1)
    assert params["base_lr"] == pytest.approx(0.1 / 8)
    assert params["step_size_up"] == pytest.approx(3.0)
    assert params["mode"] == "triangular2" and params["gamma"] == 1.0
    # The same schedule as the REST preview of those parameters, step for step.
    direct = client.post("/api/v1/schedule/preview", json={
        "params": params, "task": spec["task"], "max_points": 5000}).json()
    assert answer["preview"] == direct
    assert answer["preview"]["total_steps"] == 45 * 6  # digits: 45 batches of 32


def test_gamma_is_searched_only_when_the_first_mode_is_exp_range(client: TestClient) -> None:
    gamma = {"low": 0.99, "high": 0.9999}
    cyclic = preview_spec(client, spec={"name": "a", "space": {
        "mode": ["triangular", "exp_range"], "gamma": gamma}}).json()["params"]
    decaying = preview_spec(client, spec={"name": "b", "space": {
        "mode": ["exp_range", "triangular"], "gamma": gamma}}).json()["params"]

    assert cyclic["mode"] == "triangular" and cyclic["gamma"] == 1.0
    assert decaying["mode"] == "exp_range"
    assert decaying["gamma"] == pytest.approx(math.sqrt(0.99 * 0.9999))


def test_a_spec_the_api_would_refuse_is_refused_naming_the_field(client: TestClient) -> None:
    unknown = preview_spec(client, spec={"name": "s", "space": {"max_lrr": 0.1}})
    inverted = preview_spec(client, spec={"name": "s", "space": {
        "base_lr": {"low": 0.2, "high": 0.3}, "lr_ratio": None}})

    assert unknown.status_code == 422
    assert unknown.json()["errors"][0]["field"] == "spec.space.max_lrr"
    assert inverted.status_code == 422 and "base_lr" in inverted.json()["detail"]


def test_imagefolder_specs_need_the_batches_per_epoch(client: TestClient) -> None:
    spec = {"name": "s", "task": {"dataset": "imagefolder", "data_path": "/data/x",
                                  "epochs": 2}}

    unknown = preview_spec(client, spec=spec)
    given = preview_spec(client, spec=spec, batches_per_epoch=30)

    assert unknown.status_code == 422 and "give batches_per_epoch" in unknown.json()["detail"]
    assert given.status_code == 200 and given.json()["preview"]["total_steps"] == 60


def test_the_spec_preview_needs_read_access_when_a_read_token_is_set(sqlite_url: str) -> None:
    settings = ServerSettings(database_url=sqlite_url, read_token="reader")
    body = {"spec": {"name": "s", "task": {"epochs": 1}}}
    with TestClient(create_app(settings)) as client:
        without = client.post(SPEC_PREVIEW, json=body)
        with_token = client.post(SPEC_PREVIEW, json=body,
                                 headers={"Authorization": "Bearer reader"})

    assert without.status_code == 401
    assert with_token.status_code == 200


def test_the_preview_page_is_in_the_nav_and_loads_only_local_assets(client: TestClient) -> None:
    studies = client.get("/dashboard").text
    page = client.get("/dashboard/preview")
    assets = set(re.findall(r'(?:src|href)="([^"]+)"', page.text))

    assert 'href="/dashboard/preview"' in studies
    assert page.status_code == 200 and 'id="preview-form"' in page.text
    assert all(asset.startswith(("/", "data:")) for asset in assets), assets
    assert {client.get(asset).status_code for asset in assets
            if asset.startswith("/static/")} == {200}


def test_a_trial_page_embeds_the_task_its_schedule_is_predicted_for(
    client: TestClient,
) -> None:
    workers = FakeWorkers(client)
    workers.submit("s", n_trials=1, task={"epochs": 3, "batch_size": 64})
    trial = workers.claim("w", "s")

    page = client.get(f"/dashboard/studies/s/trials/{trial['number']}").text
    initial = json.loads(re.search(
        r'<script type="application/json" id="initial-data">(.*?)</script>', page, re.S
    ).group(1))  # type: ignore[union-attr]

    assert initial["task"]["epochs"] == 3 and initial["task"]["batch_size"] == 64
    assert initial["trial"]["lr_trace"]["total_steps"] == 0
