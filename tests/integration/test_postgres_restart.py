"""PostgreSQL restarted mid-study (stopped as by a crash, then started again).

The test runs a PostgreSQL cluster of its own, in a temporary folder on a free port, so
that stopping it disturbs nobody else's tests; it needs PostgreSQL's server binaries
(`initdb`, `pg_ctl`), and is skipped without them (failed in CI). While the database is
down the server answers 503, the workers train on and spool their results; once it is
back, everything arrives.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
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

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SETTINGS = {"lease_s": 120, "heartbeat_s": 1, "sweep_interval_s": 1, "claim_retry_s": 0.5}


class PrivateCluster:
    """A throw-away PostgreSQL cluster: trust authentication, loopback only."""

    def __init__(self, bin_dir: Path, folder: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.folder = folder
        self.data = folder / "data"
        self.port = port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        # PostgreSQL refuses to run as root: run its programs as the postgres user.
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"

    def init(self) -> None:
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off")
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "postgres.log"),
                 "-o", options, "-w", "start")

    def crash(self) -> None:
        """Stop at once, as a crash would: connections cut, recovery at the next start."""
        self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivateCluster]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found or (os.geteuid() == 0 and shutil.which("runuser") is None):
        message = "PostgreSQL's server binaries (/usr/lib/postgresql/*/bin/initdb) are absent"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must install them)")
        pytest.skip(message)
    # Not pytest's tmp_path: its parents are private to root, and the postgres user must
    # reach the folder.
    folder = Path(tempfile.mkdtemp(prefix="clrsearch-postgres-"))
    if os.geteuid() == 0:
        postgres = pwd.getpwnam("postgres")
        os.chown(folder, postgres.pw_uid, postgres.pw_gid)
    cluster = PrivateCluster(Path(found[-1]).parent, folder, free_port())
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def test_postgres_restarted_mid_study_loses_no_result(
    private_postgres: PrivateCluster, tmp_path: Path
) -> None:
    database_url = private_postgres.url
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = tmp_path / "server.log"
    server = serve(port, database_url, server_log, **SETTINGS)
    processes = [server]
    logs = [server_log]
    try:
        submit(url, {"name": "pg-restart", "n_trials": 3, "parallelism": 2, "task": TASK,
                     "pruner": "none"})
        for worker_id in ("w0", "w1"):
            worker, log = start_worker(url, worker_id, tmp_path, max_idle_s=60)
            processes.append(worker)
            logs.append(log)
        wait_until(lambda: sum(trial["epochs_run"] >= 1
                               for trial in trials(url, "pg-restart", state="running")) == 2,
                   90, "two trials with an epoch done", logs)

        # Crash the database; start it again once a report has had to wait in a spool
        private_postgres.crash()
        wait_until(lambda: count_lines(logs[1:], r"spooled \(\d+ waiting\)"), 90,
                   "a report spooled while the database is down", logs)
        private_postgres.start()
        figures = check_study(url, "pg-restart", database_url, logs)
    finally:
        stop(*processes)

    assert count_lines(logs[1:], r"HTTP 503") >= 1  # the server said the database was down
    assert figures["spooled_delivered"] >= 1
    assert figures["states"] == {"complete": 3} and figures["retried"] == 0
    summary("PostgreSQL crash and restart", figures)
