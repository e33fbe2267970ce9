"""A real uvicorn server, two real worker processes, a small digits study to the end."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.processes import clrsearch, free_port, stop, wait_for_study, wait_healthy

pytestmark = pytest.mark.slow

FINAL_STATES = {"complete", "pruned", "failed"}


def start_two_workers(url: str, tmp_path, log) -> list:
    """Worker processes w0 and w1 that leave after 3 s without work."""
    return [
        clrsearch("worker", "--server", url, "--worker-id", f"w{i}", "--threads", "1",
                  "--max-idle-s", "3", "--data-dir", str(tmp_path / "data"), log=log)
        for i in range(2)
    ]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres",
                                                            marks=pytest.mark.postgres)])
def test_digits_study_runs_to_completion_with_two_worker_processes(
    backend: str, request: pytest.FixtureRequest, tmp_path
) -> None:
    database_url = request.getfixturevalue(f"{backend}_url")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "processes.log"
    server = clrsearch("serve", "--port", str(port), "--database-url", database_url, log=log)
    workers = []
    try:
        wait_healthy(url, server, log)
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({
            "name": "e2e", "n_trials": 4, "parallelism": 2,
            "task": {"epochs": 2, "model": "mlp"},
            "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        }))
        submitted = subprocess.run(
            [sys.executable, "-m", "clrsearch", "submit", str(spec), "--server", url],
            capture_output=True, text=True, timeout=60,
        )
        assert submitted.returncode == 0, submitted.stderr
        assert "study e2e submitted" in submitted.stdout
        workers = start_two_workers(url, tmp_path, log)

        study = wait_for_study(url, "e2e", timeout_s=120)
        trials = httpx.get(f"{url}/api/v1/studies/e2e/trials", timeout=10).json()["trials"]
        best = httpx.get(f"{url}/api/v1/studies/e2e/best", timeout=10).json()
        status = subprocess.run(
            [sys.executable, "-m", "clrsearch", "status", "e2e", "--server", url],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        stop(*workers, server)

    assert study["state"] == "complete", log.read_text()
    assert len(trials) == 4
    assert all(trial["state"] in FINAL_STATES for trial in trials), (trials, log.read_text())
    assert all(trial["error"] for trial in trials if trial["state"] == "failed")
    assert {trial["worker_id"] for trial in trials} <= {"w0", "w1"}
    assert best["state"] == "complete" and best["value"] == study["best_value"]
    assert status.returncode == 0 and "e2e" in status.stdout
    for trial in trials:
        if trial["state"] == "complete":
            assert trial["epochs_run"] == 2


def test_range_test_baselines_and_search_run_on_real_workers(sqlite_url, tmp_path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "processes.log"
    server = clrsearch("serve", "--port", str(port), "--database-url", sqlite_url, log=log)
    workers = []
    try:
        wait_healthy(url, server, log)
        spec = {"name": "edge", "n_trials": 2, "parallelism": 2, "lr_bounds": "auto",
                "baselines": {"schedules": ["fixed", "onecycle"]}, "pruner": "none",
                "task": {"epochs": 2, "model": "mlp"}}
        assert httpx.post(f"{url}/api/v1/studies", json=spec, timeout=30).status_code == 201
        workers = start_two_workers(url, tmp_path, log)
        study = wait_for_study(url, "edge", timeout_s=120)
        trials = httpx.get(f"{url}/api/v1/studies/edge/trials", timeout=10).json()["trials"]
        range_test = httpx.get(f"{url}/api/v1/studies/edge/range-test", timeout=10).json()
    finally:
        stop(*workers, server)

    assert study["state"] == "complete", log.read_text()
    kinds = [(trial["number"], trial["kind"], trial["state"]) for trial in trials]
    assert kinds[:3] == [(0, "range_test", "complete"), (1, "baseline", "complete"),
                         (2, "baseline", "complete")]
    assert [kind for _, kind, _ in kinds[3:]] == ["cyclic", "cyclic"]
    assert range_test["base_lr"] < range_test["max_lr"] < range_test["loss_minimum_lr"]
    for trial in trials[3:]:
        assert range_test["max_lr"] / 2 <= trial["params"]["max_lr"] <= range_test["max_lr"] * 2
    assert study["baseline_comparison"]["baseline_schedule"] in ("fixed", "onecycle")
