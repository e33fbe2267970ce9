"""The dashboard at 10,000 trials: server time of the study page and of what it fetches.

    .venv/bin/python benchmarks/dashboard_10k.py                       # SQLite, ~1 min
    .venv/bin/python benchmarks/dashboard_10k.py \
        --database-url postgresql://postgres@127.0.0.1:5432/bench

Two studies go into one fresh database in the same run: the baseline with 100 trials and
the large one with 10,000. Both are submitted through the API (so Optuna knows them);
their trials and epochs are then written straight into our tables, which takes seconds
where the worker protocol would take hours. Trial states are mixed as in a real search:
complete (8 epochs), pruned (1-4 epochs), failed, and a few running.

Each request goes to the app in process (Starlette's TestClient: no network, no
browser), so the time is the server's. The first request of each kind is reported
(cold caches), then the median of the next repeats. Importances are left out: they
need Optuna's own storage filled with the same trials, and the page fetches them apart
from everything else, cached until a trial completes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import make_url

from service.app import create_app
from service.db import unit_of_work

with warnings.catch_warnings():
    # Starlette's notice that its TestClient would rather have httpx2; not about us.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient
from service.models import Study, Trial, TrialEpoch
from service.settings import ServerSettings, normalise_database_url

EPOCHS = 8
STEPS_PER_EPOCH = 45  # digits at batch 32
REPEATS = 10
LIMIT_S = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="a PostgreSQL server; default a SQLite file")
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--baseline-trials", type=int, default=100)
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    with tempfile.TemporaryDirectory() as scratch:
        url, cleanup = fresh_database(args.database_url, Path(scratch))
        try:
            run(url, args.baseline_trials, args.trials)
        finally:
            cleanup()


def run(url: str, baseline_trials: int, trials: int) -> None:
    with TestClient(create_app(ServerSettings(database_url=url))) as client:
        started = time.perf_counter()
        for name, count in (("small", baseline_trials), ("large", trials)):
            response = client.post("/api/v1/studies", json={
                "name": name, "n_trials": count, "parallelism": 4,
                "space": {"mode": ["triangular", "triangular2"]}})
            response.raise_for_status()
            populate(url, name, count)
        with unit_of_work(client.app.state.sessions) as session:
            epoch_rows = session.scalar(select(func.count()).select_from(TrialEpoch))
        print(f"database: {make_url(url).get_backend_name()}; {baseline_trials + trials:,} "
              f"trials and {epoch_rows:,} epoch rows in {time.perf_counter() - started:.1f} s")

        requests = [
            ("study page (first response)", "/dashboard/studies/{name}"),
            ("live stamp (polled)", "/dashboard/api/studies/{name}/live"),
            ("table page, by number", "/dashboard/api/studies/{name}/trials"),
            ("table page, by params.max_lr",
             "/dashboard/api/studies/{name}/trials?sort=params.max_lr&order=asc"),
            ("table page, by duration", "/dashboard/api/studies/{name}/trials?sort=duration"),
            ("table page, pruned only", "/dashboard/api/studies/{name}/trials?state=pruned"),
            ("history", "/dashboard/api/studies/{name}/history"),
            ("learning curves", "/dashboard/api/studies/{name}/curves"),
            ("LR schedules, top 5", "/dashboard/api/studies/{name}/schedules"),
            ("parallel coordinates", "/dashboard/api/studies/{name}/parallel"),
            ("baseline comparison", "/dashboard/api/studies/{name}/comparison"),
            ("CSV export, all trials", "/dashboard/api/studies/{name}/export.csv"),
        ]
        header = (f"| request | {baseline_trials:,} trials: first / median ms | "
                  f"{trials:,} trials: first / median ms | ratio of medians | "
                  f"bytes at {trials:,} |")
        print()
        print(header)
        print("|---|---|---|---|---|")
        page_ms = None
        for label, template in requests:
            small = timed(client, template.format(name="small"))
            large = timed(client, template.format(name="large"))
            if page_ms is None:
                page_ms = large
            print(f"| {label} | {small[0]:.1f} / {small[1]:.1f} | {large[0]:.1f} / "
                  f"{large[1]:.1f} | {large[1] / small[1]:.1f} | {large[2]:,} |")
        assert page_ms is not None
        first_s = page_ms[0] / 1000
        print()
        print(f"study page at {trials:,} trials: first response {page_ms[0]:.0f} ms, "
              f"median {page_ms[1]:.0f} ms; limit {LIMIT_S * 1000:.0f} ms: "
              f"{'met' if first_s < LIMIT_S else 'MISSED'}")


def timed(client: TestClient, path: str) -> tuple[float, float, int]:
    """(first request ms, median of the repeats ms, response bytes)."""
    samples = []
    size = 0
    for _ in range(REPEATS + 1):
        started = time.perf_counter()
        response = client.get(path)
        samples.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        size = len(response.content)
    return samples[0], statistics.median(samples[1:]), size


def populate(url: str, name: str, count: int) -> None:
    """Trials and epochs straight into our tables, in bulk, with a realistic mix of states."""
    rng = random.Random(0)
    engine = create_engine(normalise_database_url(url))
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with engine.begin() as connection:
        study_id = connection.scalar(select(Study.id).where(Study.name == name))
        trial_rows, epoch_plans = [], []
        for number in range(count):
            state = rng.choices(["complete", "pruned", "failed"], [0.5, 0.45, 0.05])[0]
            if number >= count - 4:
                state = "running"
            epochs = {"complete": EPOCHS, "pruned": rng.randint(1, 4),
                      "failed": rng.randint(0, 3), "running": rng.randint(0, 6)}[state]
            max_lr = 10 ** rng.uniform(-2, math.log10(0.5))
            base_lr = max_lr / 10 ** rng.uniform(math.log10(3), 1)
            step_size_up = rng.uniform(1, 4)
            final = 0.02 + abs(rng.gauss(0, 0.05))
            started = now - dt.timedelta(seconds=30 * (count - number))
            trial_rows.append({
                "study_id": study_id, "number": number, "kind": "cyclic",
                "optuna_trial_id": None, "state": state,
                "params": {"base_lr": base_lr, "max_lr": max_lr,
                           "step_size_up": step_size_up, "step_size_down": None,
                           "step_size_unit": "epochs",
                           "mode": rng.choice(["triangular", "triangular2"]),
                           "gamma": 1.0, "scale_mode": None, "cycle_momentum": True,
                           "base_momentum": 0.85, "max_momentum": 0.95},
                "attempts": 1, "infra_losses": 0, "worker_id": f"gpu-{number % 4}",
                "value": final if state in ("complete", "pruned") else None,
                "epochs_run": epochs,
                "error": "RuntimeError: CUDA out of memory" if state == "failed" else None,
                "created_at": started, "started_at": started,
                "finished_at": None if state == "running" else started
                + dt.timedelta(seconds=20 + 2 * epochs),
            })
            epoch_plans.append((epochs, final, base_lr, max_lr, step_size_up))
        connection.execute(insert(Trial), trial_rows)
        ids = dict(connection.execute(
            select(Trial.number, Trial.id).where(Trial.study_id == study_id)).all())
        batch = []
        for number, (epochs, final, base_lr, max_lr, step_size_up) in enumerate(epoch_plans):
            for epoch in range(1, epochs + 1):
                loss = final + 0.8 * (EPOCHS - epoch) / EPOCHS
                batch.append({
                    "trial_id": ids[number], "epoch": epoch,
                    "iterations": epoch * STEPS_PER_EPOCH, "train_loss": loss * 0.9,
                    "val_loss": loss, "val_accuracy": 1 - loss / 2, "duration_s": 2.0,
                    "lrs": triangle(epoch, base_lr, max_lr, step_size_up),
                    "momentums": [0.9] * STEPS_PER_EPOCH, "decision": "continue",
                    "created_at": now,
                })
            if len(batch) >= 5000:
                connection.execute(insert(TrialEpoch), batch)
                batch = []
        if batch:
            connection.execute(insert(TrialEpoch), batch)
    engine.dispose()


def triangle(epoch: int, base_lr: float, max_lr: float, step_size_up: float) -> list[float]:
    half = max(1, round(step_size_up * STEPS_PER_EPOCH))
    lrs = []
    for step in range((epoch - 1) * STEPS_PER_EPOCH, epoch * STEPS_PER_EPOCH):
        position = step % (2 * half)
        rise = position / half if position < half else 2 - position / half
        lrs.append(base_lr + (max_lr - base_lr) * rise)
    return lrs


def fresh_database(server_url: str | None, folder: Path):
    """A new, empty database, and how to drop it afterwards."""
    if server_url is None:
        return f"sqlite:///{folder / 'bench.db'}", lambda: None
    admin = create_engine(normalise_database_url(server_url), isolation_level="AUTOCOMMIT")
    name = f"clrsearch_bench_{random.randrange(16**8):08x}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    url = make_url(normalise_database_url(server_url)).set(database=name)
    return url.render_as_string(hide_password=False), drop


if __name__ == "__main__":
    main()
