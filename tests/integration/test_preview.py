"""POST /api/v1/schedule/preview equals torch's CyclicLR step by step."""

from __future__ import annotations

import math

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServerSettings


@pytest.fixture
def client(sqlite_url: str):
    with TestClient(create_app(ServerSettings(database_url=sqlite_url))) as client:
        yield client


def reference(params: dict, up: int, down: int, steps: int, adamw: bool = False):
    weight = torch.nn.Parameter(torch.zeros(1))
    if adamw:
        optimizer = torch.optim.AdamW([weight], lr=0.1, betas=(0.9, 0.999))
    else:
        optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CyclicLR(
        optimizer, params["base_lr"], params["max_lr"], step_size_up=up, step_size_down=down,
        mode=params.get("mode", "triangular"), gamma=params.get("gamma", 1.0),
        cycle_momentum=params.get("cycle_momentum", True), base_momentum=0.85,
        max_momentum=0.95,
    )
    lrs, momentums = [], []
    key = "betas" if adamw else "momentum"
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        value = optimizer.param_groups[0][key]
        momentums.append(value[0] if adamw else value)
        optimizer.step()
        scheduler.step()
    return lrs, momentums


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_preview_equals_torch_cyclic_lr_at_every_step(client, mode, optimizer) -> None:
    params = {"base_lr": 0.002, "max_lr": 0.05, "step_size_up": 7, "step_size_down": 13,
              "step_size_unit": "iterations", "mode": mode, "gamma": 0.995}
    body = {"params": params, "task": {"epochs": 3, "optimizer": {"name": optimizer}},
            "batches_per_epoch": 25, "max_points": 1000}

    preview = client.post("/api/v1/schedule/preview", json=body).json()
    lrs, momentums = reference(params, 7, 13, 75, adamw=optimizer == "adamw")

    assert preview["total_steps"] == 75
    assert preview["lr"] == lrs
    assert preview["momentum"] == momentums


def test_preview_converts_epoch_step_sizes_with_the_digits_batch_count(client) -> None:
    params = {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 2}
    preview = client.post("/api/v1/schedule/preview",
                          json={"params": params, "task": {"epochs": 4}}).json()

    # digits: 1797 images, 359 held out, 1438 in batches of 32.
    assert preview["batches_per_epoch"] == math.ceil(1438 / 32) == 45
    assert (preview["step_size_up"], preview["step_size_down"]) == (90, 90)
    lrs, _ = reference({**params, "step_size_unit": "iterations"}, 90, 90, 180)
    assert preview["lr"] == lrs


def test_preview_refuses_impossible_parameters_and_unknown_sizes(client) -> None:
    inverted = client.post("/api/v1/schedule/preview", json={
        "params": {"base_lr": 0.1, "max_lr": 0.01, "step_size_up": 2}})
    unknown = client.post("/api/v1/schedule/preview", json={
        "params": {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 2},
        "task": {"dataset": "imagefolder", "data_path": "/data/x"}})

    assert inverted.status_code == 422 and "max_lr must be above base_lr" in inverted.text
    assert unknown.status_code == 422 and "give batches_per_epoch" in unknown.text
