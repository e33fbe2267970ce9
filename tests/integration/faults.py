"""Helpers of the fault-injection tests: real processes, and the checks every one makes.

Each test ends with `check_study`, which asserts what issue 4 asks of every fault: the
study finished, every trial is in a final state, none is left running or queued, no
epoch is recorded twice, and no complete trial misses an epoch. It returns the figures
(trials run, retried, resumed, results delivered from a spool) that the test prints as
one `reliability summary` line, the source of `docs/reliability.md`.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch
from sqlalchemy import create_engine, text

from clrsearch.spec import CyclicParams, TaskSpec
from service.settings import normalise_database_url
from tests.processes import clrsearch, wait_for_study, wait_healthy
from worker.data import DatasetCache
from worker.training import TrialOutcome, train_trial

FINAL_STATES = {"complete", "pruned", "failed", "stopped"}
# A short lease and a quick sweeper, so that a killed worker's trial is retried within
# seconds; heartbeats every second keep the leases of live workers.
FAST_LEASES = {"lease_s": 3, "sweep_interval_s": 1, "heartbeat_s": 1, "claim_retry_s": 0.5}
# Digits, the MLP, one sample per step: an epoch is 1,438 steps, about half a second on
# one thread, long enough to stop a worker in the middle of one.
TASK = {"dataset": "digits", "model": "mlp", "epochs": 4, "batch_size": 1}


def server_env(**settings: Any) -> dict[str, str]:
    return {f"CLRSEARCH_{name.upper()}": str(value) for name, value in settings.items()}


def serve(port: int, database_url: str, log: Path, **settings: Any) -> subprocess.Popen[bytes]:
    server = clrsearch("serve", "--port", str(port), "--database-url", database_url, log=log,
                       env=server_env(**settings))
    wait_healthy(f"http://127.0.0.1:{port}", server, log)
    return server


def start_worker(url: str, worker_id: str, tmp_path: Path, max_idle_s: float = 3,
                 checkpoints: bool = True) -> tuple[subprocess.Popen[bytes], Path]:
    """A `clrsearch worker` process with its own log file; data and checkpoints shared."""
    log = tmp_path / f"worker-{worker_id}.log"
    args = ["worker", "--server", url, "--worker-id", worker_id, "--threads", "1",
            "--max-idle-s", str(max_idle_s), "--data-dir", str(tmp_path / "data")]
    if checkpoints:
        args += ["--checkpoint-dir", str(tmp_path / "checkpoints")]
    return clrsearch(*args, log=log), log


def submit(url: str, spec: dict[str, Any]) -> None:
    response = httpx.post(f"{url}/api/v1/studies", json=spec, timeout=30)
    assert response.status_code == 201, response.text


def trials(url: str, name: str, state: str | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"limit": 1000}
    if state is not None:
        params["state"] = state
    response = httpx.get(f"{url}/api/v1/studies/{name}/trials", params=params, timeout=10)
    response.raise_for_status()
    return response.json()["trials"]


def trial_detail(url: str, name: str, number: int) -> dict[str, Any]:
    response = httpx.get(f"{url}/api/v1/studies/{name}/trials/{number}",
                         params={"max_points": 100_000}, timeout=30)
    response.raise_for_status()
    return response.json()


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str,
               logs: list[Path] | None = None) -> Any:
    """Poll `condition` until it gives something true; its value is returned."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = condition()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(0.05)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs or [])
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tails}")


def count_lines(logs: list[Path], pattern: str) -> int:
    expression = re.compile(pattern)
    return sum(len(expression.findall(log.read_text())) for log in logs if log.exists())


def check_study(url: str, name: str, database_url: str, logs: list[Path],
                timeout_s: float = 120) -> dict[str, Any]:
    """Wait for the study's end and assert that nothing was lost, stuck or doubled."""
    everything = "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in logs)
    try:
        study = wait_for_study(url, name, timeout_s=timeout_s)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{everything}") from None
    assert study["state"] == "complete", everything
    rows = trials(url, name)
    epochs = study["spec"]["task"]["epochs"]
    assert len(rows) == study["n_trials"]
    assert all(trial["state"] in FINAL_STATES for trial in rows), rows
    for trial in rows:
        recorded = [epoch["epoch"] for epoch in trial_detail(url, name, trial["number"])["epochs"]]
        # Epochs 1..n, each once: nothing lost in between, nothing recorded twice.
        assert recorded == list(range(1, trial["epochs_run"] + 1)), (trial, recorded)
        if trial["state"] == "complete":
            assert trial["epochs_run"] == epochs, trial
    assert duplicate_epochs(database_url) == []
    spools = list((logs[0].parent / "data" / "spool").glob("*/*.json"))
    assert spools == [], f"results left undelivered: {spools}"
    return {
        "trials": len(rows),
        "states": dict(Counter(trial["state"] for trial in rows)),
        "retried": sum(trial["attempts"] > 1 for trial in rows),
        "attempts": sum(trial["attempts"] for trial in rows),
        "resumed": count_lines(logs, r"resumes from its checkpoint after epoch"),
        "spooled_delivered": count_lines(logs, r"spooled [a-z0-9 ]+ delivered"),
        "dropped": count_lines(logs, r"dropped: "),
        "lost": 0,
    }


def duplicate_epochs(database_url: str) -> list[tuple[int, int, int]]:
    """(trial number, epoch, rows) for every epoch with more than one row in trial_epochs."""
    engine = create_engine(normalise_database_url(database_url))
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(
                "SELECT t.number, e.epoch, COUNT(*) FROM trial_epochs e "
                "JOIN trials t ON t.id = e.trial_id GROUP BY t.number, e.epoch "
                "HAVING COUNT(*) > 1"))]
    finally:
        engine.dispose()


def reference_run(params: dict[str, Any], task: dict[str, Any], data_dir: Path) -> TrialOutcome:
    """The trial trained in this process, uninterrupted, on one thread as the workers are."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = TaskSpec(**task)
        data = DatasetCache(data_dir).get(spec)
        return train_trial(CyclicParams(**params), spec, "val_loss", data,
                           torch.device("cpu"), lambda _: "continue")
    finally:
        torch.set_num_threads(threads)


def summary(test: str, figures: dict[str, Any]) -> None:
    """The line that `docs/reliability.md` quotes (`pytest -s` shows it)."""
    print(f"reliability summary {test}: {json.dumps(figures, sort_keys=True)}")
