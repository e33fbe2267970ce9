"""What the benchmarks share: fresh databases, a real `clrsearch serve` process, simulated
workers that train nothing, Optuna driven by hand over the same search space, figures.

Every benchmark runs its baseline in the same run as the service it measures, because
the machine is shared and noisy: a figure only means something next to a baseline
measured under the same load.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import optuna
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from service.settings import normalise_database_url
from tests.processes import clrsearch, free_port, stop, wait_healthy

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
# Five reports per trial, as in issue 6's baseline.
EPOCHS = 5
# The digits task at batch size 32 has 45 optimizer steps per epoch; each report
# carries one LR and one momentum per step, as a real worker's does.
STEPS_PER_EPOCH = 45
MODES = ["triangular", "triangular2"]
RETRIES_AFTER_UNSEEN_TRIAL = 5
# Optuna's own MedianPruner defaults, so the hand-driven baseline is `MedianPruner()`;
# not cycle-aware, so that the server asks the pruner at every epoch as the baseline does.
MEDIAN_PRUNER = {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 0,
                 "cycle_aware": False}


def add_common_options(parser: argparse.ArgumentParser, trials: int) -> None:
    parser.add_argument("--trials", type=int, default=trials,
                        help=f"trials in the study (default {trials})")
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite",
                        help="database kind for the server and the baseline")
    parser.add_argument("--postgres-url",
                        default=os.environ.get("CLRSEARCH_TEST_POSTGRES_URL",
                                               DEFAULT_POSTGRES_URL),
                        help="PostgreSQL server on which fresh databases are created")
    parser.add_argument("--ask-ahead", action="store_true",
                        help="run the server with CLRSEARCH_ASK_AHEAD=true (off by default)")
    parser.add_argument("--claim-apart", action="store_true",
                        help="simulated workers claim in calls of their own instead of "
                             "with each completion (claim_next), as workers did before")


def server_options(args: argparse.Namespace) -> dict[str, str]:
    """Server settings the common options ask for, as `running_server` keywords."""
    return {"ask_ahead": "true"} if args.ask_ahead else {}


def quiet_optuna() -> None:
    # Optuna logs every trial at INFO; thousands of lines would bury the figures.
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- databases and the server -------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(kind: str, workdir: Path, postgres_url: str) -> Iterator[str]:
    """A new, empty database of `kind`; a PostgreSQL one is dropped afterwards."""
    name = f"clrsearch_bench_{secrets.token_hex(4)}"
    if kind == "sqlite":
        yield f"sqlite:///{workdir / name}.db"
        return
    admin_url = normalise_database_url(postgres_url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class Server:
    url: str
    pid: int
    log: Path

    def cpu_s(self) -> float:
        """CPU time (user + system) the server has used so far: its process and the
        processes it started (the ask-ahead proposer) while they run."""
        return sum(_process_cpu_s(pid) for pid in _process_tree(self.pid))


def _process_tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                pids.extend(_process_tree(int(child)))
    return pids


def _process_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0  # it ended meanwhile
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running_server(database_url: str, workdir: Path, **env: str) -> Iterator[Server]:
    """`clrsearch serve` as its own process (uvicorn, one process) on `database_url`."""
    port = free_port()
    log = workdir / f"server-{port}.log"
    process = clrsearch("serve", "--port", str(port), "--database-url", database_url,
                        "--log-level", "WARNING", log=log,
                        env={f"CLRSEARCH_{key.upper()}": value for key, value in env.items()})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        yield Server(url=url, pid=process.pid, log=log)
    except BaseException:
        # The folder goes away with the run: show what the server said about the failure.
        print(f"--- end of the server's log ---\n{log.read_text()[-4000:]}", file=sys.stderr)
        raise
    finally:
        stop(process)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="clrsearch-bench-") as folder:
        yield Path(folder)


# -- the study and its simulated results --------------------------------------------------


def study_spec(name: str, n_trials: int, parallelism: int, sampler: str = "tpe",
               seed: int = 0, pruner: str = "median") -> dict[str, Any]:
    """A study of five searched parameters (four floats, one choice) and five epochs."""
    return {
        "name": name,
        "n_trials": n_trials,
        "parallelism": parallelism,
        "space": {
            "max_lr": {"low": 0.01, "high": 0.5, "log": True},
            "lr_ratio": {"low": 3.0, "high": 10.0, "log": True},
            "step_size_up": {"low": 1.0, "high": 4.0},
            "step_size_down": {"low": 1.0, "high": 4.0},
            "mode": MODES,
        },
        "task": {"epochs": EPOCHS},
        "sampler": sampler,
        "sampler_seed": seed,
        "pruner": MEDIAN_PRUNER if pruner == "median" else "none",
    }


def suggest(trial: optuna.Trial) -> dict[str, Any]:
    """The same five parameters, asked in the order the server asks them."""
    max_lr = trial.suggest_float("max_lr", 0.01, 0.5, log=True)
    lr_ratio = trial.suggest_float("lr_ratio", 3.0, 10.0, log=True)
    mode = trial.suggest_categorical("mode", MODES)
    return {
        "max_lr": max_lr,
        "base_lr": max_lr / lr_ratio,
        "mode": mode,
        "step_size_up": trial.suggest_float("step_size_up", 1.0, 4.0),
        "step_size_down": trial.suggest_float("step_size_down", 1.0, 4.0),
    }


def simulated_losses(params: dict[str, Any], number: int) -> list[float]:
    """Validation losses of five epochs: a smooth function of the settings plus noise,
    so that the sampler has something to learn and the median pruner prunes some."""
    noise = random.Random(number)
    quality = (
        (math.log10(params["max_lr"]) + 1.0) ** 2
        + 0.02 * params["max_lr"] / params["base_lr"]
        + 0.05 * abs(params["step_size_up"] - 2.0)
        + (0.1 if params["mode"] == "triangular2" else 0.0)
    )
    return [quality + 1.0 / epoch + noise.gauss(0.0, 0.02) for epoch in range(1, EPOCHS + 1)]


# -- one trial cycle, through the service or through Optuna by hand ----------------------


@dataclass
class Cycle:
    """One trial's calls: how long each took, in seconds."""

    number: int
    # A claim of its own; 0 for a trial that came with the last trial's completion.
    claim_s: float
    report_s: list[float] = field(default_factory=list)
    complete_s: float = 0.0
    total_s: float = 0.0
    pruned: bool = False
    finished_at: float = 0.0
    # The objective a trial that ran to its end completed with; None when pruned.
    value: float | None = None
    # The trial came with the last trial's completion (claim_s is then 0), whose time,
    # like every completion's unless the worker claims apart, includes the next claim.
    came_with_completion: bool = False


class SimulatedWorker:
    """The worker protocol as a real worker speaks it, with no training in between:
    claim, report each epoch and follow the answer, complete (also after a prune, as
    `worker.loop` does), the completion carrying the next claim (`claim_apart`: claims of
    their own, as workers before `claim_next` did)."""

    def __init__(self, server_url: str, worker_id: str, claim_apart: bool = False) -> None:
        self.worker_id = worker_id
        self.claim_apart = claim_apart
        self.http = httpx.Client(base_url=f"{server_url}/api/v1/worker", timeout=120)
        self.retry_after_s = 0.0
        # 404s for a trial this worker was just given (see `_post`).
        self.unseen_trial = 0
        # The answer to the claim that went with the last completion.
        self._claimed: dict[str, Any] | None = None

    def close(self) -> None:
        self.http.close()

    def cycle(self) -> Cycle | None:
        """Run one trial; None when the server had none to give."""
        started = time.perf_counter()
        answer, self._claimed = self._claimed, None
        came_with_completion = answer is not None
        if answer is None:
            answer = self._post("/claim", self._claim_request())
        claimed = time.perf_counter()
        trial = answer["trial"]
        if trial is None:
            self.retry_after_s = answer["retry_after_s"]
            return None
        cycle = Cycle(number=trial["number"], claim_s=claimed - started,
                      came_with_completion=came_with_completion)
        path = f"/trials/{trial['trial_id']}"
        for epoch, loss in enumerate(simulated_losses(trial["params"], trial["number"]), 1):
            sent = time.perf_counter()
            decision = self._post(f"{path}/report", report_body(trial["lease_id"], epoch, loss))
            cycle.report_s.append(time.perf_counter() - sent)
            if decision["action"] != "continue":
                cycle.pruned = decision["action"] == "prune"
                break
        sent = time.perf_counter()
        body = {"lease_id": trial["lease_id"], "value": loss, "pruned": cycle.pruned}
        if not self.claim_apart:
            body["claim_next"] = self._claim_request()
        claimed = self._post(f"{path}/complete", body).get("next")
        # An empty answer is not kept: by the next cycle there may be work (another study).
        self._claimed = claimed if claimed and claimed["trial"] is not None else None
        cycle.value = None if cycle.pruned else loss
        cycle.finished_at = time.perf_counter()
        cycle.complete_s = cycle.finished_at - sent
        cycle.total_s = cycle.finished_at - started
        return cycle

    def _claim_request(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "device": "sim"}

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(path, json=body)
        for _ in range(RETRIES_AFTER_UNSEEN_TRIAL):
            if response.status_code != 404:
                break
            # The server answers a claim before its transaction commits (FastAPI runs a
            # yield dependency's exit after sending the response), so a call made at
            # once can miss the trial. Counted, reported, and retried, so that a long
            # run survives it; a real worker would have dropped the trial.
            self.unseen_trial += 1
            time.sleep(0.01)
            response = self.http.post(path, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{path} answered {response.status_code}: {response.text}")
        return response.json()


def report_body(lease_id: str, epoch: int, loss: float) -> dict[str, Any]:
    return {
        "lease_id": lease_id, "epoch": epoch, "iterations": epoch * STEPS_PER_EPOCH,
        "train_loss": loss, "val_loss": loss, "val_accuracy": 0.5, "duration_s": 0.0,
        "lrs": [0.01 + 0.001 * step for step in range(STEPS_PER_EPOCH)],
        "momentums": [0.9] * STEPS_PER_EPOCH,
    }


def submit(server_url: str, spec: dict[str, Any]) -> None:
    response = httpx.post(f"{server_url}/api/v1/studies", json=spec, timeout=120)
    if response.status_code != 201:
        raise RuntimeError(f"study refused ({response.status_code}): {response.text}")


class HandDriven:
    """Optuna driven by hand, as a user would without clrsearch: ask, report and
    should_prune each epoch but the last, tell. TPE with Optuna 5's defaults,
    `MedianPruner()`."""

    def __init__(self, storage: str | optuna.storages.BaseStorage | None, seed: int = 0,
                 sampler: str = "tpe", pruner: str = "median") -> None:
        chosen = (optuna.samplers.RandomSampler(seed=seed) if sampler == "random"
                  else optuna.samplers.TPESampler(seed=seed))
        self.study = optuna.create_study(
            storage=storage, study_name=f"hand-{secrets.token_hex(4)}", sampler=chosen,
            pruner=(optuna.pruners.MedianPruner() if pruner == "median"
                    else optuna.pruners.NopPruner()),
        )

    def cycle(self) -> Cycle:
        started = time.perf_counter()
        trial = self.study.ask()
        params = suggest(trial)
        cycle = Cycle(number=trial.number, claim_s=time.perf_counter() - started)
        for epoch, loss in enumerate(simulated_losses(params, trial.number), 1):
            sent = time.perf_counter()
            trial.report(loss, epoch)
            # The server's rule, so that both sides do the same work: the pruner is not
            # asked at the last epoch, where pruning saves nothing.
            pruned = epoch < EPOCHS and bool(trial.should_prune())
            cycle.report_s.append(time.perf_counter() - sent)
            if pruned:
                cycle.pruned = True
                break
        sent = time.perf_counter()
        if cycle.pruned:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(trial, loss)
            cycle.value = loss
        cycle.finished_at = time.perf_counter()
        cycle.complete_s = cycle.finished_at - sent
        cycle.total_s = cycle.finished_at - started
        return cycle


# -- figures --------------------------------------------------------------------------------


def windows(n_trials: int) -> list[tuple[int, int]]:
    """The first 100 trials and the last 100 (900-1,000 of 1,000); halves of a short run."""
    width = min(100, n_trials // 2)
    return [(0, width), (n_trials - width, n_trials)]


def rate(durations: Sequence[float]) -> float:
    """Trials per second of trials run one after another."""
    return len(durations) / sum(durations) if durations else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def own_claims_ms(window: Sequence[Cycle]) -> str:
    """The median claim made in a call of its own; "-" when every claim came with a
    completion."""
    own = [cycle.claim_s for cycle in window if not cycle.came_with_completion]
    return ms(percentile(own, 50)) if own else "-"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, so the output can be pasted into docs/benchmarks.md as it is."""
    cells = [[str(cell) for cell in header]] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine() -> str:
    return (f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
            f"Optuna {optuna.__version__}, load average {os.getloadavg()[0]:.2f} at start")
