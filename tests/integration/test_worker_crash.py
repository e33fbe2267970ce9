"""Workers lost mid-trial: killed outright (SIGKILL) or asked to leave (SIGTERM).

A killed worker's lease lapses and its trial is retried; with a checkpoint folder the
retry resumes after the last epoch the killed attempt saved, and runs the very schedule
(LR and momentum at every step) and losses of a run that was never interrupted.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.integration.faults import (
    FAST_LEASES,
    TASK,
    check_study,
    reference_run,
    serve,
    start_worker,
    submit,
    summary,
    trial_detail,
    trials,
    wait_until,
)
from tests.processes import free_port, stop

pytestmark = pytest.mark.slow

KILLS = 3
# At most this many kills per trial, so that the kills spread over the study.
KILLS_PER_TRIAL = 2


def test_worker_killed_mid_trial_is_retried_and_resumes_with_the_same_schedule(
    sqlite_url: str, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = tmp_path / "server.log"
    server = serve(port, sqlite_url, server_log, **FAST_LEASES)
    processes = [server]
    logs = [server_log]
    kills: list[tuple[int, int]] = []  # (trial number, epochs recorded when killed)
    try:
        submit(url, {
            "name": "crash", "n_trials": 3, "parallelism": 1, "max_retries": KILLS,
            "task": TASK, "pruner": "none", "sampler": "random", "sampler_seed": 0,
        })

        # Kill the worker holding a trial in the middle of an epoch, each time further
        # into the trial than its last kill. A standby worker (another id), started
        # beforehand so that its start-up overlaps, claims the trial once the lease lapses.
        workers: dict[str, subprocess.Popen[bytes]] = {}

        def launch(worker_id: str) -> None:
            worker, log = start_worker(url, worker_id, tmp_path, max_idle_s=60)
            workers[worker_id] = worker
            processes.append(worker)
            logs.append(log)

        def killable() -> tuple[str, int, int] | None:
            for trial in trials(url, "crash", state="running"):
                done = [epochs for number, epochs in kills if number == trial["number"]]
                if (len(done) < KILLS_PER_TRIAL
                        and max(done, default=0) < trial["epochs_run"] < TASK["epochs"] - 1):
                    return trial["worker_id"], trial["number"], trial["epochs_run"]
            return None

        launch("w0")
        for round_ in range(KILLS):
            launch(f"w{round_ + 1}")
            worker_id, number, epochs_run = wait_until(killable, 60, "a trial to kill", logs)
            workers[worker_id].send_signal(signal.SIGKILL)
            workers[worker_id].wait(timeout=10)
            kills.append((number, epochs_run))

        figures = check_study(url, "crash", sqlite_url, logs)
        killed = {number: trial_detail(url, "crash", number) for number, _ in kills}
    finally:
        stop(*processes)

    # Every kill was followed by a resume from at least the epoch recorded at the kill
    resumes = [(int(number), int(epoch)) for number, epoch in re.findall(
        r"trial (\d+) of study 'crash' resumes from its checkpoint after epoch (\d+)",
        "\n".join(log.read_text() for log in logs))]
    for number, epochs_at_kill in kills:
        assert any(resumed == number and after >= epochs_at_kill
                   for resumed, after in resumes), (kills, resumes)

    # A retried trial ran exactly the uninterrupted run's schedule and losses
    for number, detail in killed.items():
        # At least: a heartbeat starved on a loaded machine may cost a retry of its own.
        assert detail["attempts"] >= 1 + sum(n == number for n, _ in kills)
        reference = reference_run(detail["params"], TASK, tmp_path / "data")
        lrs = [lr for epoch in reference.epochs for lr in epoch.lrs]
        momentums = [m for epoch in reference.epochs for m in epoch.momentums]
        assert detail["lr_trace"]["total_steps"] == len(lrs)
        assert detail["lr_trace"]["lr"] == lrs
        assert detail["lr_trace"]["momentum"] == momentums
        assert [epoch["val_loss"] for epoch in detail["epochs"]] == [
            epoch.val_loss for epoch in reference.epochs]
        assert [epoch["train_loss"] for epoch in detail["epochs"]] == [
            epoch.train_loss for epoch in reference.epochs]
    assert not list((tmp_path / "checkpoints").glob("*/*.pt")), "checkpoints left behind"
    summary("worker SIGKILL", {**figures, "kills": len(kills)})


def test_worker_stopped_with_sigterm_hands_its_trial_back_and_the_next_one_resumes_it(
    sqlite_url: str, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = tmp_path / "server.log"
    # A long lease: the trial can only come back this soon if the worker hands it back.
    server = serve(port, sqlite_url, server_log, lease_s=600, heartbeat_s=1, claim_retry_s=0.5)
    processes = [server]
    logs = [server_log]
    try:
        submit(url, {"name": "sigterm", "n_trials": 1, "parallelism": 1, "task": TASK,
                     "pruner": "none"})
        leaving, log = start_worker(url, "leaving", tmp_path, max_idle_s=60)
        processes.append(leaving)
        logs.append(log)
        wait_until(lambda: any(0 < trial["epochs_run"] < TASK["epochs"] - 1
                               for trial in trials(url, "sigterm", state="running")),
                   60, "an epoch of the first trial", logs)

        leaving.send_signal(signal.SIGTERM)
        assert leaving.wait(timeout=30) == 0
        handed_back = httpx.get(f"{url}/api/v1/studies/sigterm/trials/0", timeout=10).json()

        successor, log = start_worker(url, "successor", tmp_path)
        processes.append(successor)
        logs.append(log)
        figures = check_study(url, "sigterm", sqlite_url, logs)
        finished = trial_detail(url, "sigterm", 0)
    finally:
        stop(*processes)

    assert handed_back["state"] == "queued", handed_back
    assert "handed back: the worker was shut down mid-trial" in handed_back["error"]
    assert finished["attempts"] == 2 and finished["worker_id"] == "successor"
    assert "resumes from its checkpoint after epoch" in (tmp_path / "worker-successor.log"
                                                         ).read_text()
    summary("worker SIGTERM", figures)
