"""Many workers claiming at once on PostgreSQL: no trial twice, no limit exceeded."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.processes import clrsearch, free_port, stop, wait_healthy

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

WORKERS = 16
PARALLELISM = 4
N_TRIALS = 40


def test_concurrent_claims_never_share_a_trial_or_exceed_limits(postgres_url, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    server = clrsearch("serve", "--port", str(port), "--database-url", postgres_url,
                       "--log-level", "WARNING", log=log,
                       env={"CLRSEARCH_CLAIM_RETRY_S": "0.05"})
    holding = 0
    most_held = 0
    lock = threading.Lock()
    claimed: list[int] = []
    errors: list[str] = []

    def simulated_worker(index: int) -> None:
        nonlocal holding, most_held
        rng = random.Random(index)
        with httpx.Client(base_url=f"{url}/api/v1/worker", timeout=30) as client:
            while True:
                answer = client.post("/claim", json={"worker_id": f"sim-{index}"}).json()
                trial = answer["trial"]
                if trial is None:
                    study = client.get(f"{url}/api/v1/studies/load").json()
                    if study["state"] != "running":
                        return
                    time.sleep(answer["retry_after_s"])
                    continue
                # The server counts this trial as running from before the claim answered
                # until after complete is sent, so our count can only be lower than its.
                with lock:
                    holding += 1
                    most_held = max(most_held, holding)
                    claimed.append(trial["trial_id"])
                time.sleep(rng.uniform(0, 0.05))
                body = {"lease_id": trial["lease_id"], "epoch": 1, "iterations": 1,
                        "train_loss": 1.0, "val_loss": rng.random(), "val_accuracy": 0.5,
                        "duration_s": 0.0}
                decision = client.post(f"/trials/{trial['trial_id']}/report", json=body)
                with lock:
                    holding -= 1
                done = client.post(f"/trials/{trial['trial_id']}/complete",
                                   json={"lease_id": trial["lease_id"], "value": 0.5})
                if decision.status_code != 200 or done.status_code != 200:
                    errors.append(f"{decision.text} {done.text}")

    try:
        wait_healthy(url, server, log)
        spec = {"name": "load", "n_trials": N_TRIALS, "parallelism": PARALLELISM,
                "pruner": "none", "sampler": "random"}
        assert httpx.post(f"{url}/api/v1/studies", json=spec, timeout=30).status_code == 201
        threads = [threading.Thread(target=simulated_worker, args=(i,)) for i in range(WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        trials = httpx.get(f"{url}/api/v1/studies/load/trials",
                           params={"limit": 1000}, timeout=30).json()
        study = httpx.get(f"{url}/api/v1/studies/load", timeout=30).json()
    finally:
        stop(server)

    assert not errors, errors
    assert all(count == 1 for count in Counter(claimed).values())
    assert len(claimed) == N_TRIALS
    assert 1 < most_held <= PARALLELISM
    assert trials["total"] == N_TRIALS
    assert sorted(trial["number"] for trial in trials["trials"]) == list(range(N_TRIALS))
    assert study["state"] == "complete"
    assert study["counts"]["complete"] == N_TRIALS
