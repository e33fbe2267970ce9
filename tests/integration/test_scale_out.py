"""Several server processes on one PostgreSQL database stay correct.

Two `clrsearch serve` instances on different ports stand for two hosts behind a load
balancer; the first runs `--workers 2`, so three serving processes share the database.
Simulated workers send each call to the next server in turn, as a round-robin balancer
would, so a trial is claimed on one process, reported on another and completed on a
third. No trial may be handed out twice, nor more run at once than the parallelism.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.processes import clrsearch, free_port, stop, wait_healthy

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

WORKERS = 10
PARALLELISM = 3
N_TRIALS = 24


def test_two_servers_on_one_database_never_share_a_trial_or_exceed_parallelism(
    postgres_url, tmp_path
):
    log = tmp_path / "servers.log"
    env = {"CLRSEARCH_CLAIM_RETRY_S": "0.05"}
    # Migrate first, as a deployment does (compose's `migrate`): servers starting at once
    # on an empty database would each try to create the tables.
    migrated = subprocess.run(
        [sys.executable, "-m", "clrsearch", "db", "upgrade", "--database-url", postgres_url],
        capture_output=True, text=True, timeout=120,
    )
    assert migrated.returncode == 0, migrated.stderr
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    servers = [
        clrsearch("serve", "--port", str(ports[0]), "--database-url", postgres_url,
                  "--workers", "2", "--log-level", "WARNING", log=log, env=env),
        clrsearch("serve", "--port", str(ports[1]), "--database-url", postgres_url,
                  "--log-level", "WARNING", log=log, env=env),
    ]
    lock = threading.Lock()
    holding = 0
    most_held = 0
    most_running_seen = 0
    claimed: list[int] = []
    claims_by_server: Counter[str] = Counter()
    problems: list[str] = []
    finished = threading.Event()

    def simulated_worker(index: int) -> None:
        nonlocal holding, most_held
        rng = random.Random(index)
        # Each worker starts at a different server, then takes them in turn.
        balancer = itertools.islice(itertools.cycle(urls), index % 2, None)
        with httpx.Client(timeout=30) as client:
            while not finished.is_set():
                server = next(balancer)
                answer = client.post(f"{server}/api/v1/worker/claim",
                                     json={"worker_id": f"sim-{index}"}).json()
                trial = answer["trial"]
                if trial is None:
                    study = client.get(f"{next(balancer)}/api/v1/studies/spread").json()
                    if study["state"] != "running":
                        return
                    time.sleep(answer["retry_after_s"])
                    continue
                # The server counts the trial as running from before its answer until
                # after complete, so this count can only be below the server's own.
                with lock:
                    holding += 1
                    most_held = max(most_held, holding)
                    claimed.append(trial["trial_id"])
                    claims_by_server[server] += 1
                path = f"/api/v1/worker/trials/{trial['trial_id']}"
                # At once, and to another server: the claim must be committed before its
                # answer leaves, or the other server does not know the trial yet.
                beat = client.post(f"{next(balancer)}{path}/heartbeat",
                                   json={"lease_id": trial["lease_id"]})
                if beat.status_code != 200:
                    problems.append(f"heartbeat right after the claim: {beat.status_code} "
                                    f"{beat.text}")
                # Long enough to overlap with other claims even on a busy machine.
                time.sleep(rng.uniform(0.05, 0.15))
                report = client.post(f"{next(balancer)}{path}/report", json={
                    "lease_id": trial["lease_id"], "epoch": 1, "iterations": 1,
                    "train_loss": 1.0, "val_loss": rng.random(), "val_accuracy": 0.5,
                    "duration_s": 0.0,
                })
                with lock:
                    holding -= 1
                done = client.post(f"{next(balancer)}{path}/complete",
                                   json={"lease_id": trial["lease_id"], "value": 0.5})
                if report.status_code != 200 or done.status_code != 200:
                    problems.append(f"{report.status_code} {report.text} "
                                    f"{done.status_code} {done.text}")

    def watch_running() -> None:
        nonlocal most_running_seen
        with httpx.Client(timeout=30) as client:
            for server in itertools.cycle(urls):
                if finished.wait(0.02):
                    return
                counts = client.get(f"{server}/api/v1/studies/spread").json()["counts"]
                most_running_seen = max(most_running_seen, counts["running"])

    try:
        for url, server in zip(urls, servers, strict=True):
            wait_healthy(url, server, log, timeout_s=90)
        spec = {"name": "spread", "n_trials": N_TRIALS, "parallelism": PARALLELISM,
                "pruner": "none", "sampler": "random", "task": {"epochs": 1}}
        assert httpx.post(f"{urls[1]}/api/v1/studies", json=spec, timeout=30).status_code == 201
        threads = [threading.Thread(target=simulated_worker, args=(i,)) for i in range(WORKERS)]
        watcher = threading.Thread(target=watch_running)
        for thread in [*threads, watcher]:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        finished.set()
        watcher.join(timeout=30)
        study = httpx.get(f"{urls[0]}/api/v1/studies/spread", timeout=30).json()
        trials = httpx.get(f"{urls[1]}/api/v1/studies/spread/trials",
                           params={"limit": 1000}, timeout=30).json()
    finally:
        finished.set()
        stop(*servers)

    assert not problems, problems
    assert len(claimed) == N_TRIALS
    assert all(count == 1 for count in Counter(claimed).values())
    assert set(claims_by_server) == set(urls)
    assert 1 < most_held <= PARALLELISM
    assert most_running_seen <= PARALLELISM
    assert study["state"] == "complete", log.read_text()
    assert study["counts"]["complete"] == N_TRIALS
    assert sorted(trial["number"] for trial in trials["trials"]) == list(range(N_TRIALS))
    assert all(trial["attempts"] == 1 for trial in trials["trials"])
