"""The server killed (SIGKILL) mid-study and restarted on the same port and database.

The workers train on while it is away and keep their results in their spools; one of
them is even restarted (under another id) before the server returns, and its successor
delivers what it left. Every epoch arrives, once.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.integration.faults import (
    TASK,
    check_study,
    count_lines,
    serve,
    start_worker,
    submit,
    summary,
    trials,
    wait_until,
)
from tests.processes import free_port, stop

pytestmark = pytest.mark.slow

# Leases long enough to outlast the outage: a lease that lapsed while the server was
# away would send the trial to another worker, a case test_worker_crash covers.
SETTINGS = {"lease_s": 120, "heartbeat_s": 1, "sweep_interval_s": 1, "claim_retry_s": 0.5}


def test_server_killed_and_restarted_mid_study_loses_no_result(
    sqlite_url: str, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = tmp_path / "server.log"
    server = serve(port, sqlite_url, server_log, **SETTINGS)
    processes = [server]
    logs = [server_log]
    try:
        submit(url, {"name": "restart", "n_trials": 3, "parallelism": 2, "task": TASK,
                     "pruner": "none"})
        workers = {}
        for worker_id in ("w0", "w1"):
            workers[worker_id], log = start_worker(url, worker_id, tmp_path, max_idle_s=60)
            processes.append(workers[worker_id])
            logs.append(log)
        wait_until(lambda: sum(trial["epochs_run"] >= 1
                               for trial in trials(url, "restart", state="running")) == 2,
                   90, "two trials with an epoch done", logs)

        # Kill the server; the workers finish their trials with nobody to tell
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        finished_alone = wait_until(
            lambda: next((worker_id for worker_id in workers if "the completion is spooled"
                          in (tmp_path / f"worker-{worker_id}.log").read_text()), None),
            90, "a trial finished while the server is away", logs)

        # Restart that worker before the server is back: its successor delivers for it
        workers[finished_alone].send_signal(signal.SIGTERM)
        assert workers[finished_alone].wait(timeout=30) == 0
        successor, log = start_worker(url, "successor", tmp_path)
        processes.append(successor)
        logs.append(log)

        server = serve(port, sqlite_url, server_log, **SETTINGS)
        processes.append(server)
        figures = check_study(url, "restart", sqlite_url, logs)
    finally:
        stop(*processes)

    left_behind = (tmp_path / f"worker-{finished_alone}.log").read_text()
    assert "undelivered results" in left_behind
    assert count_lines([log], r"left by worker .+ taken into this worker's spool") >= 1
    assert figures["spooled_delivered"] >= 2
    assert figures["states"] == {"complete": 3} and figures["retried"] == 0
    summary("server SIGKILL and restart", figures)
