"""`clrsearch demo`: a whole study on this machine, start to finish.

Starts a server on loopback with a SQLite file, two worker processes, submits a digits
study with pruning on, shows progress, and compares the best settings found with the
starting point most people use: torch's documented example bounds (base_lr 0.01,
max_lr 0.1) with a half cycle of 2 epochs. That starting point runs as trial 0 of the
study, through the same workers, so both scores come from the same task and seed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

STARTING_POINT = {"max_lr": 0.1, "lr_ratio": 10.0, "step_size_up": 2.0}
LOG_FILE = Path("clrsearch-demo.log")


def demo_spec(name: str, trials: int, parallelism: int) -> dict[str, Any]:
    return {
        "name": name,
        "n_trials": trials,
        "parallelism": parallelism,
        "task": {"dataset": "digits", "model": "cnn", "epochs": 6, "batch_size": 32},
        "space": {"mode": ["triangular", "triangular2"]},
        "pruner": {"name": "median", "n_startup_trials": 4, "n_warmup_steps": 2},
        "enqueue": [{**STARTING_POINT, "mode": "triangular"}],
        "sampler_seed": 0,
    }


def run_demo(trials: int, workers: int, port: int, database_url: str, console: Console) -> int:
    server_url = f"http://127.0.0.1:{port}"
    name = "digits-demo-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    command = [sys.executable, "-m", "clrsearch"]
    processes: list[subprocess.Popen[bytes]] = []
    log = LOG_FILE.open("ab")
    console.print(f"logs go to {LOG_FILE}; the study is kept in {database_url}")
    try:
        processes.append(subprocess.Popen(
            [*command, "serve", "--port", str(port), "--database-url", database_url],
            stdout=log, stderr=log,
        ))
        _wait_for_server(server_url, processes[0])
        response = httpx.post(f"{server_url}/api/v1/studies",
                              json=demo_spec(name, trials, workers), timeout=60)
        response.raise_for_status()
        for index in range(workers):
            processes.append(subprocess.Popen(
                [*command, "worker", "--server", server_url, "--worker-id",
                 f"demo-worker-{index + 1}", "--threads", "1", "--max-idle-s", "5"],
                stdout=log, stderr=log,
            ))
        study = _follow(server_url, name, trials, console, processes)
        _show_result(server_url, study, console)
        return 0 if study["state"] == "complete" else 1
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
            if process.poll() is None:
                process.kill()
        log.close()


def _wait_for_server(url: str, server: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the demo server exited early; see {LOG_FILE}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"the demo server did not answer within {timeout_s:.0f} s; "
                       f"see {LOG_FILE}")


def _follow(url: str, name: str, trials: int, console: Console,
            processes: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(f"study {name}", total=trials, detail="")
        while True:
            study = httpx.get(f"{url}/api/v1/studies/{name}", timeout=30).json()
            counts = study["counts"]
            done = counts["complete"] + counts["pruned"] + counts["failed"] + counts["stopped"]
            best = study["best_value"]
            detail = (f"{counts['running']} running, {counts['pruned']} pruned, "
                      f"best val_loss {best:.4f}" if best is not None
                      else f"{counts['running']} running")
            progress.update(bar, completed=done, detail=detail)
            if study["state"] != "running":
                return study
            if all(process.poll() is not None for process in processes[1:]):
                console.print(f"[red]every worker has exited; see {LOG_FILE}[/red]")
                return study
            time.sleep(1.0)


def _show_result(url: str, study: dict[str, Any], console: Console) -> None:
    best = study["best_trial"]
    if best is None:
        console.print("[red]no trial completed[/red]")
        return
    start = httpx.get(f"{url}/api/v1/studies/{study['name']}/trials/0", timeout=30).json()
    best_detail = httpx.get(
        f"{url}/api/v1/studies/{study['name']}/trials/{best['number']}", timeout=30
    ).json()
    table = Table(title=f"study {study['name']}: best settings against the starting point")
    table.add_column("")
    table.add_column("starting point (trial 0)")
    table.add_column(f"best (trial {best['number']})")
    for key in ("base_lr", "max_lr", "step_size_up", "mode"):
        table.add_row(key, _fmt(start["params"][key]), _fmt(best["params"][key]))
    table.add_row("state", start["state"], best["state"])
    table.add_row("val_loss", _fmt(start["value"]), _fmt(best["value"]))
    table.add_row("val_accuracy", _fmt(_last_accuracy(start)), _fmt(_last_accuracy(best_detail)))
    console.print(table)
    counts = study["counts"]
    console.print(
        f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed. "
        f"See it again with `clrsearch serve` then `clrsearch status {study['name']}`."
    )


def _last_accuracy(trial: dict[str, Any]) -> float | None:
    return trial["epochs"][-1]["val_accuracy"] if trial["epochs"] else None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
