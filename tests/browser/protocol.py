"""Drive a real server through the worker protocol with httpx: trials without training.

The LR each fake epoch reports is a triangular CyclicLR wave built from the trial's own
parameters, so the charts get the shapes they would get from a real worker.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import httpx

STEPS_PER_EPOCH = 20


@dataclass
class Server:
    """A running `clrsearch serve`, its database, and fake workers pointed at it."""

    url: str
    database_url: str
    workers: FakeWorkers


class FakeWorkers:
    """Claims, reports and ends trials over HTTP, as many workers would."""

    def __init__(self, http: httpx.Client) -> None:
        # A plain client for a real server, or Starlette's TestClient for one in process.
        self.http = http

    def submit(self, name: str, **spec: Any) -> dict[str, Any]:
        response = self.http.post("/api/v1/studies", json={"name": name, **spec})
        assert response.status_code == 201, response.text
        return response.json()

    def claim(self, worker_id: str, study: str, device: str = "cpu") -> dict[str, Any]:
        """A trial of `study`: the server hands out the oldest running study's first."""
        response = self.http.post("/api/v1/worker/claim", json={
            "worker_id": worker_id, "host": "test-host", "device": device})
        assert response.status_code == 200, response.text
        trial = response.json()["trial"]
        assert trial is not None, f"no trial for {worker_id}: {response.text}"
        assert trial["study_name"] == study, f"{worker_id} was given a trial of another study"
        return trial

    def report(self, trial: dict[str, Any], epoch: int, val_loss: float) -> str:
        lrs = triangular_lrs(trial["params"], epoch)
        response = self.http.post(f"/api/v1/worker/trials/{trial['trial_id']}/report", json={
            "lease_id": trial["lease_id"], "epoch": epoch,
            "iterations": epoch * STEPS_PER_EPOCH, "train_loss": val_loss * 0.9,
            "val_loss": val_loss, "val_accuracy": max(0.0, min(1.0, 1 - val_loss / 3)),
            "duration_s": 0.5, "lrs": lrs,
            "momentums": [0.95 - (lr - trial["params"]["base_lr"]) for lr in lrs],
        })
        assert response.status_code == 200, response.text
        return response.json()["action"]

    def complete(self, trial: dict[str, Any], value: float) -> str:
        response = self.http.post(f"/api/v1/worker/trials/{trial['trial_id']}/complete",
                                  json={"lease_id": trial["lease_id"], "value": value})
        assert response.status_code == 200, response.text
        return response.json()["state"]

    def fail(self, trial: dict[str, Any], error: str) -> str:
        response = self.http.post(f"/api/v1/worker/trials/{trial['trial_id']}/fail",
                                  json={"lease_id": trial["lease_id"], "error": error})
        assert response.status_code == 200, response.text
        return response.json()["state"]

    def heartbeat(self, trial: dict[str, Any]) -> None:
        response = self.http.post(f"/api/v1/worker/trials/{trial['trial_id']}/heartbeat",
                                  json={"lease_id": trial["lease_id"]})
        assert response.status_code == 200, response.text


def triangular_lrs(params: dict[str, Any], epoch: int) -> list[float]:
    """The LR of each step of `epoch` for a triangular cycle with the trial's bounds."""
    up = max(1, round(params["step_size_up"] * STEPS_PER_EPOCH))
    down = max(1, round((params.get("step_size_down") or params["step_size_up"])
                        * STEPS_PER_EPOCH))
    low, high = params["base_lr"], params["max_lr"]
    lrs = []
    for step in range((epoch - 1) * STEPS_PER_EPOCH, epoch * STEPS_PER_EPOCH):
        position = step % (up + down)
        rise = position / up if position < up else 1 - (position - up) / down
        lrs.append(low + (high - low) * rise)
    return lrs


def add_baseline_run(
    session: Any, study_name: str, losses: tuple[float, ...], now: dt.datetime
) -> None:
    """A complete fixed-LR run written straight into the database, as a baseline would be."""
    from sqlalchemy import select

    from service.models import Study, Trial, TrialEpoch

    study_id = session.scalar(select(Study.id).where(Study.name == study_name))
    trial = Trial(
        study_id=study_id, number=1000, kind="baseline", state="complete",
        params={"schedule": "fixed", "lr": 0.05}, value=losses[-1], attempts=1,
        epochs_run=len(losses), created_at=now, started_at=now, finished_at=now,
    )
    session.add(trial)
    session.flush()
    for epoch, loss in enumerate(losses, start=1):
        session.add(TrialEpoch(
            trial_id=trial.id, epoch=epoch, iterations=epoch * STEPS_PER_EPOCH,
            train_loss=loss, val_loss=loss, val_accuracy=0.5, duration_s=0.5,
            lrs=[0.05] * STEPS_PER_EPOCH, momentums=[0.9] * STEPS_PER_EPOCH,
            decision="continue", created_at=now,
        ))
