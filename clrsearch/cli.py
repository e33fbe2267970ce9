"""The `clrsearch` command: serve, worker, submit, status, demo, db upgrade.

Server and worker code is imported inside each command, so that `clrsearch status`
does not pay for importing torch and Optuna.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Hyperparameter search for torch's CyclicLR schedules.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
db_app = typer.Typer(help="Database commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")

console = Console()
errors = Console(stderr=True)

ServerOption = Annotated[str, typer.Option(
    "--server", envvar="CLRSEARCH_SERVER_URL", help="The server's base URL.")]
AdminTokenOption = Annotated[str | None, typer.Option(
    "--token", envvar="CLRSEARCH_ADMIN_TOKEN", help="Admin token, when the server has one.",
    show_default=False)]
ReadTokenOption = Annotated[str | None, typer.Option(
    "--token", envvar="CLRSEARCH_READ_TOKEN", help="Read token, when the server has one.",
    show_default=False)]


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: a worker's log would be mostly heartbeats.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Optuna logs each trial at INFO through its own handler; our logs already say it.
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    database_url: Annotated[str | None, typer.Option(
        help="SQLAlchemy URL; default sqlite:///clrsearch.db.")] = None,
    insecure: Annotated[bool, typer.Option(
        help="Allow a non-loopback address without tokens.")] = False,
    workers: Annotated[int, typer.Option(
        min=1, help="Server processes sharing the port (use PostgreSQL for more than one).",
    )] = 1,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Run the API server (applies database migrations first)."""
    import uvicorn

    from service.app import create_app
    from service.settings import ServerSettings

    overrides: dict[str, Any] = {"host": host, "port": port, "database_url": database_url}
    settings = ServerSettings(
        **{key: value for key, value in overrides.items() if value is not None},
        **({"insecure": True} if insecure else {}),
    )
    try:
        settings.check_exposure()
    except ValueError as error:
        errors.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    configure_logging(log_level)
    if workers == 1:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                    log_level=log_level.lower(), access_log=False)
        return
    _serve_processes(settings, workers, log_level, insecure)


def _serve_processes(settings: Any, workers: int, log_level: str, insecure: bool) -> None:
    """`serve --workers N`: uvicorn's worker processes, each building its own app."""
    import uvicorn

    from service.migrations import upgrade_database

    if settings.database_url.startswith("sqlite"):
        logging.getLogger(__name__).warning(
            "%d server processes on SQLite take turns at its single write lock; "
            "use PostgreSQL to serve many workers", workers)
    # Once, here: N processes applying the first migration at once would race to create
    # the same tables. Each process still checks the schema, which is then a no-op.
    upgrade_database(settings.database_url)
    # The processes are fresh interpreters that read their settings from CLRSEARCH_*
    # variables, so what the options said travels to them through the environment.
    os.environ.update({
        "CLRSEARCH_HOST": settings.host, "CLRSEARCH_PORT": str(settings.port),
        "CLRSEARCH_DATABASE_URL": settings.database_url, "CLRSEARCH_LOG_LEVEL": log_level,
    })
    if insecure:
        os.environ["CLRSEARCH_INSECURE"] = "true"
    uvicorn.run("clrsearch.cli:serving_process_app", factory=True, host=settings.host,
                port=settings.port, workers=workers, log_level=log_level.lower(),
                access_log=False)


def serving_process_app() -> Any:
    """The app of one `serve --workers N` process (a uvicorn factory)."""
    from service.app import app_from_environment

    # Logging is per process: without this a serving process would drop our INFO lines.
    configure_logging(os.environ.get("CLRSEARCH_LOG_LEVEL", "INFO"))
    return app_from_environment()


@app.command()
def worker(
    server: ServerOption = "http://127.0.0.1:8000",
    worker_id: Annotated[str | None, typer.Option(
        help="Stable id; a restarted worker with the same id gets its trial back.")] = None,
    device: Annotated[str | None, typer.Option(
        help="auto, cpu, cuda or cuda:N (default: CLRSEARCH_DEVICE, else auto).",
        show_default=False)] = None,
    devices: Annotated[str | None, typer.Option(
        help="One worker process per GPU, each seeing only its own: 'all' or a list "
             "such as 0,1. Dead processes are restarted.", show_default=False)] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where datasets are kept.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(
        help="Checkpoint each epoch here, so that a retried trial resumes (a folder shared "
             "by all workers lets any of them resume it). Default: no checkpoints.",
        show_default=False)] = None,
    max_idle_s: Annotated[float | None, typer.Option(
        help="Leave after this long without work (default: never).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Run a worker: claim trials, train them, report, repeat."""
    if checkpoint_dir is not None:
        # Through the environment, so that the processes of --devices inherit it too.
        os.environ["CLRSEARCH_CHECKPOINT_DIR"] = str(checkpoint_dir)
    if devices is not None:
        _supervise_workers(devices, server, worker_id, device, data_dir, max_idle_s, threads,
                           log_level)
        return
    from worker.loop import Worker
    from worker.settings import WorkerSettings

    overrides: dict[str, Any] = {
        "server_url": server, "worker_id": worker_id, "device": device, "data_dir": data_dir,
        "max_idle_s": max_idle_s, "torch_threads": threads,
    }
    settings = WorkerSettings(**{k: v for k, v in overrides.items() if v is not None})
    configure_logging(log_level)
    runner = Worker(settings)
    runner.install_signal_handlers()
    runner.run()


def _supervise_workers(devices: str, server: str, worker_id: str | None, device: str | None,
                       data_dir: Path | None, max_idle_s: float | None, threads: int | None,
                       log_level: str) -> None:
    """`worker --devices`: one `clrsearch worker` process per device, kept alive."""
    import socket

    from worker.supervisor import Supervisor, resolve_devices

    configure_logging(log_level)
    try:
        device_list = resolve_devices(devices)
    except ValueError as error:
        errors.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    # The children inherit the environment; options given here are passed on as options.
    worker_args = ["--server", server, "--log-level", log_level]
    for option, value in (("--device", device), ("--data-dir", data_dir),
                          ("--max-idle-s", max_idle_s), ("--threads", threads)):
        if value is not None:
            worker_args += [option, str(value)]
    base_id = worker_id or os.environ.get("CLRSEARCH_WORKER_ID") or socket.gethostname()
    supervisor = Supervisor(device_list, worker_args, base_id)
    supervisor.install_signal_handlers()
    raise typer.Exit(supervisor.run())


@app.command()
def submit(
    spec_file: Annotated[Path, typer.Argument(help="A study spec, as JSON.", exists=True,
                                              dir_okay=False, readable=True)],
    server: ServerOption = "http://127.0.0.1:8000",
    token: AdminTokenOption = None,
) -> None:
    """Submit a study spec (the same JSON document as POST /api/v1/studies)."""
    try:
        spec = json.loads(spec_file.read_text())
    except json.JSONDecodeError as error:
        errors.print(f"[red]error:[/red] {spec_file} is not valid JSON: {error}")
        raise typer.Exit(2) from None
    study = _request("POST", server, "/api/v1/studies", token, json=spec)
    console.print(f"study [bold]{study['name']}[/bold] submitted: {study['n_trials']} trials, "
                  f"{study['parallelism']} at a time, objective {study['objective']}")


@app.command()
def status(
    study: Annotated[str | None, typer.Argument(help="A study's name for its trials.")] = None,
    server: ServerOption = "http://127.0.0.1:8000",
    token: ReadTokenOption = None,
    limit: Annotated[int, typer.Option(help="Trials to show.")] = 50,
) -> None:
    """Show a table of studies, or of one study's trials."""
    if study is None:
        console.print(studies_table(_request("GET", server, "/api/v1/studies", token)))
        return
    detail = _request("GET", server, f"/api/v1/studies/{study}", token)
    page = _request("GET", server, f"/api/v1/studies/{study}/trials", token,
                    params={"limit": limit})
    console.print(studies_table([detail]))
    console.print(trials_table(page["trials"], detail["objective"]))
    if page["total"] > len(page["trials"]):
        console.print(f"({len(page['trials'])} of {page['total']} trials shown; --limit)")


@app.command()
def demo(
    trials: Annotated[int, typer.Option(help="Trials in the demo study.")] = 20,
    workers: Annotated[int, typer.Option(help="Local worker processes.")] = 2,
    port: Annotated[int, typer.Option(help="Port for the demo server.")] = 8765,
    database_url: Annotated[str, typer.Option(help="Where the study is kept.")] = (
        "sqlite:///clrsearch.db"),
) -> None:
    """Run a demo study on the bundled digits data with a local server and workers."""
    from clrsearch.demo import run_demo

    raise typer.Exit(run_demo(trials=trials, workers=workers, port=port,
                              database_url=database_url, console=console))


@app.command("range-test")
def range_test(
    task_file: Annotated[Path | None, typer.Argument(
        help="A task as JSON (the spec's `task`); default: digits with the small CNN.",
        exists=True, dir_okay=False)] = None,
    server: Annotated[str | None, typer.Option(
        "--server", envvar="CLRSEARCH_SERVER_URL", show_default=False,
        help="Run it on the server's workers instead of here.")] = None,
    name: Annotated[str | None, typer.Option(help="Study name (with --server).")] = None,
    token: AdminTokenOption = None,
    end_lr: Annotated[float, typer.Option(help="Highest LR of the ramp.")] = 10.0,
    epochs: Annotated[int, typer.Option(help="Epochs the ramp lasts.")] = 2,
) -> None:
    """Run Smith's LR range test and print the bounds it suggests."""
    import datetime as dt
    import time

    from clrsearch.spec import RangeTestSpec, TaskSpec

    task = TaskSpec.model_validate_json(task_file.read_text()) if task_file else TaskSpec()
    test = RangeTestSpec(end_lr=end_lr, epochs=epochs)
    if server is None:
        result = _range_test_here(task, test)
    else:
        name = name or "range-test-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        _request("POST", server, "/api/v1/range-tests", token, json={
            "name": name, "task": task.model_dump(mode="json"),
            "range_test": test.model_dump(mode="json")})
        console.print(f"range test {name} submitted; waiting for a worker to run it")
        while (result := _request("GET", server, f"/api/v1/studies/{name}/range-test",
                                  token))["state"] in ("queued", "running"):
            time.sleep(1.0)
    if result.get("max_lr") is None:
        errors.print(f"[red]no bounds:[/red] {result.get('error') or 'the test did not finish'}")
        raise typer.Exit(1)
    table = Table(title="LR range test")
    table.add_column("")
    table.add_column("LR")
    table.add_row("suggested base_lr", f"{result['base_lr']:.4g}")
    table.add_row("suggested max_lr", f"{result['max_lr']:.4g}")
    table.add_row("loss minimum at", f"{result['loss_minimum_lr']:.4g}")
    console.print(table)
    console.print(f"{len(result['lrs'])} points from {result['lrs'][0]:.3g} to "
                  f"{result['lrs'][-1]:.3g}" + (", stopped when the loss diverged"
                                                if result["diverged"] else ""))


def _range_test_here(task: Any, test: Any) -> dict[str, Any]:
    from clrsearch.lr_bounds import CurveTooFlat, suggest_bounds
    from worker.data import DatasetCache
    from worker.loop import pick_device
    from worker.range_test import run_range_test
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    data = DatasetCache(settings.data_dir).get(task)
    with console.status("running the range test here"):
        curve = run_range_test(test, task, data, pick_device(settings.device))
    result: dict[str, Any] = {"lrs": curve.lrs, "losses": curve.losses,
                              "diverged": curve.diverged, "max_lr": None}
    try:
        bounds = suggest_bounds(curve.lrs, curve.losses)
    except CurveTooFlat as error:
        return {**result, "error": str(error)}
    return {**result, "base_lr": bounds.base_lr, "max_lr": bounds.max_lr,
            "loss_minimum_lr": bounds.loss_minimum_lr}


@db_app.command("upgrade")
def db_upgrade(
    database_url: Annotated[str | None, typer.Option(
        help="SQLAlchemy URL; default CLRSEARCH_DATABASE_URL or sqlite:///clrsearch.db.")] = None,
) -> None:
    """Apply clrsearch's migrations and create or check Optuna's tables."""
    from service.migrations import upgrade_database
    from service.settings import ServerSettings

    url = database_url or ServerSettings().database_url
    configure_logging("INFO")
    upgrade_database(url)
    console.print("database is up to date")


def _request(method: str, server: str, path: str, token: str | None, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, server.rstrip("/") + path, headers=headers,
                                 timeout=30, **kwargs)
    except httpx.TransportError as error:
        errors.print(f"[red]error:[/red] cannot reach the server at {server} ({error}); "
                     "is `clrsearch serve` running? (--server or CLRSEARCH_SERVER_URL)")
        raise typer.Exit(1) from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        errors.print(f"[red]error ({response.status_code}):[/red] {detail}")
        raise typer.Exit(1)
    return response.json()


def studies_table(studies: list[dict[str, Any]]) -> Table:
    table = Table(title="studies")
    for column in ("name", "state", "done / budget", "running", "best", "objective",
                   "sampler", "pruner"):
        table.add_column(column)
    for study in studies:
        counts = study["counts"]
        done = counts["complete"] + counts["pruned"] + counts["failed"] + counts["stopped"]
        best = study["best_value"]
        table.add_row(
            study["name"], study["state"], f"{done} / {study['n_trials']}",
            str(counts["running"]), "-" if best is None else f"{best:.4f}",
            study["objective"], study["sampler"], study["pruner"],
        )
    return table


def trials_table(trials: list[dict[str, Any]], objective: str) -> Table:
    table = Table(title="trials")
    for column in ("#", "state", objective, "base_lr", "max_lr", "step up", "mode",
                   "epochs", "worker"):
        table.add_column(column)
    for trial in trials:
        params = trial["params"]
        value = trial["value"]
        table.add_row(
            str(trial["number"]), trial["state"], "-" if value is None else f"{value:.4f}",
            f"{params['base_lr']:.3g}", f"{params['max_lr']:.3g}",
            f"{params['step_size_up']:.3g} {params['step_size_unit']}", params["mode"],
            str(trial["epochs_run"]), trial["worker_id"] or "-",
        )
    return table


def main() -> None:  # pragma: no cover - console script entry
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
