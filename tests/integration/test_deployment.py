"""docker-compose.yml, run without Docker: each service's command as a local process.

Docker cannot run here, so this runs what the compose file says each container runs:
its `command` after the image's ENTRYPOINT, with the image's CLRSEARCH_* ENV and the
service's `environment` (valueless entries from `.env`), variables interpolated from a
filled-in `.env.example`. What only Docker provides is mapped onto this machine, and
nothing else is changed:

- the `postgres` service is the local PostgreSQL, a fresh database for the test;
- service host names and the server's container port are loopback and a free port;
- named volumes are folders under the test's tmp_path;
- the worker container's one GPU is faked with CUDA_VISIBLE_DEVICES=0 (torch then sees
  no CUDA here and the worker runs on CPU), and the CPU override's worker runs beside it.

Then the migration runs, the server and both kinds of worker start, the images'
healthchecks pass, and a small study submitted with `clrsearch submit` completes.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.compose import (
    CPU_OVERRIDE,
    ENV_EXAMPLE,
    ROOT,
    compose_model,
    dockerfile_stages,
    exec_form,
    image_environment,
    read_env_file,
    service_environment,
    stage_setting,
)
from tests.processes import free_port, stop, wait_for_study, wait_healthy

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

APP_DIR = "/app/"  # the Dockerfile's WORKDIR, where the source lies in the images


class LocalCompose:
    """Turns a service of the compose model into a command and environment for here."""

    def __init__(self, model: dict[str, Any], variables: dict[str, str], database_url: str,
                 server_port: int, volumes_root: Path) -> None:
        self.model = model
        self.variables = variables
        self.database_url = database_url
        self.stages = dockerfile_stages()
        server = self.environment_in_container("server")
        self.container_port = server["CLRSEARCH_PORT"]
        self.server_port = server_port
        self.volumes_root = volumes_root

    def service(self, name: str) -> dict[str, Any]:
        return self.model["services"][name]

    def environment_in_container(self, name: str) -> dict[str, str]:
        service = self.service(name)
        image = image_environment(self.stages, service["build"]["target"])
        return {**image, **service_environment(service, self.variables)}

    def command(self, name: str) -> list[str]:
        entrypoint = stage_setting(self.stages, self.service(name)["build"]["target"],
                                   "ENTRYPOINT")
        assert entrypoint == '["clrsearch"]'
        return [sys.executable, "-m", "clrsearch", *self.service(name)["command"]]

    def environment(self, name: str) -> dict[str, str]:
        """The container's environment with Docker's names and paths mapped to this host."""
        mounts = {}
        for volume in self.service(name).get("volumes", []):
            source, target = volume.split(":")[:2]
            mounts[target] = self.volumes_root / source
        local = {}
        for key, value in self.environment_in_container(name).items():
            if key == "CLRSEARCH_DATABASE_URL":
                value = self.database_url
            elif key == "CLRSEARCH_HOST" and value == "0.0.0.0":
                value = "127.0.0.1"
            elif key == "CLRSEARCH_PORT":
                value = str(self.server_port)
            elif key == "CLRSEARCH_SERVER_URL":
                value = self.server_url
            elif value in mounts:
                value = str(mounts[value])
            local[key] = value
        # Nothing from this test's own environment may stand in for the service's.
        inherited = {key: value for key, value in os.environ.items()
                     if not key.startswith("CLRSEARCH_") and key != "CUDA_VISIBLE_DEVICES"}
        return {**inherited, "PYTHONUNBUFFERED": "1", **local}

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def healthcheck(self, target: str) -> list[str]:
        """The image's HEALTHCHECK command, or the service's when compose sets one."""
        declared = (self.service("server").get("healthcheck", {}).get("test")
                    if target == "server" else None)
        command = declared[1:] if declared else exec_form(
            stage_setting(self.stages, target, "HEALTHCHECK"))
        return [sys.executable if part == "python" else
                part.replace(APP_DIR, f"{ROOT}/", 1) if part.startswith(APP_DIR) else part
                for part in command]


def filled_env_file() -> dict[str, str]:
    variables = read_env_file(ENV_EXAMPLE)
    for name in ("CLRSEARCH_ADMIN_TOKEN", "CLRSEARCH_WORKER_TOKEN", "POSTGRES_PASSWORD"):
        assert variables[name] == "", f"{name} must be left for the user to fill in"
        variables[name] = secrets.token_urlsafe(16)
    # Optional ones, set so that their path through compose is exercised too.
    variables["CLRSEARCH_READ_TOKEN"] = secrets.token_urlsafe(16)
    variables["CLRSEARCH_TORCH_THREADS"] = "1"
    return variables


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                cwd=log.parent)


def test_compose_services_run_as_processes_and_finish_a_study(postgres_url, tmp_path):
    variables = filled_env_file()
    model = compose_model(variables)
    cpu_model = compose_model(variables, CPU_OVERRIDE)
    local = LocalCompose(model, variables, postgres_url, free_port(), tmp_path / "volumes")
    local_cpu = LocalCompose(cpu_model, variables, postgres_url, local.server_port,
                             tmp_path / "volumes")
    postgres = service_environment(local.service("postgres"), variables)

    # The wiring Docker would resolve by name: database, server address and tokens.
    for name in ("migrate", "server"):
        url = make_url(local.environment_in_container(name)["CLRSEARCH_DATABASE_URL"])
        assert (url.host, url.port or 5432, url.username, url.password, url.database) == (
            "postgres", 5432, postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"],
            postgres["POSTGRES_DB"])
    server_in_container = local.environment_in_container("server")
    assert local.service("server")["ports"][0].rsplit(":", 1)[1] == local.container_port
    for worker in (local, local_cpu):
        environment = worker.environment_in_container("worker")
        address = urlsplit(environment["CLRSEARCH_SERVER_URL"])
        assert (address.hostname, str(address.port)) == ("server", local.container_port)
        assert environment["CLRSEARCH_WORKER_TOKEN"] == server_in_container[
            "CLRSEARCH_WORKER_TOKEN"]

    log = tmp_path / "processes.log"
    migrated = subprocess.run(local.command("migrate"), env=local.environment("migrate"),
                              capture_output=True, text=True, timeout=120)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "database is up to date" in migrated.stdout

    server = start(local.command("server"), local.environment("server"), log)
    gpu_worker = cpu_worker = None
    admin = {"Authorization": f"Bearer {variables['CLRSEARCH_ADMIN_TOKEN']}"}
    reader = {"Authorization": f"Bearer {variables['CLRSEARCH_READ_TOKEN']}"}
    try:
        wait_healthy(local.server_url, server, log, timeout_s=90)
        gpu_worker = start(local.command("worker"),
                           {**local.environment("worker"), "CUDA_VISIBLE_DEVICES": "0"}, log)
        cpu_worker = start(local_cpu.command("worker"), local_cpu.environment("worker"), log)

        spec = tmp_path / "study.json"
        spec.write_text(json.dumps({
            "name": "compose", "n_trials": 2, "parallelism": 2, "pruner": "none",
            "task": {"dataset": "digits", "model": "mlp", "epochs": 1},
        }))
        submitted = subprocess.run(
            [sys.executable, "-m", "clrsearch", "submit", str(spec), "--server",
             local.server_url, "--token", variables["CLRSEARCH_ADMIN_TOKEN"]],
            capture_output=True, text=True, timeout=60,
        )
        assert submitted.returncode == 0, submitted.stderr
        study = wait_for_study(local.server_url, "compose", timeout_s=120, headers=reader)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            workers = httpx.get(f"{local.server_url}/api/v1/workers", headers=admin,
                                timeout=10).json()
            if len(workers) == 2:
                break
            time.sleep(0.5)
        unauthenticated = httpx.get(f"{local.server_url}/api/v1/studies", timeout=10)
        health = {
            target: subprocess.run(check.healthcheck(target), env=check.environment(role),
                                   capture_output=True, text=True, timeout=30)
            for target, check, role in [("server", local, "server"),
                                        ("worker", local, "worker"),
                                        ("worker-cpu", local_cpu, "worker")]
        }
    finally:
        stop(*(process for process in (gpu_worker, cpu_worker) if process), server)

    text = log.read_text()
    assert study["state"] == "complete", text
    assert study["counts"]["complete"] == 2
    assert unauthenticated.status_code == 401
    assert len(workers) == 2, workers
    assert {worker["device"] for worker in workers} == {"cpu"}
    assert any(worker["id"].endswith("-gpu0") for worker in workers), workers
    assert all(result.returncode == 0 for result in health.values()), health
    # `serve --workers 2`: two serving processes answered on the one port.
    assert text.count("Application startup complete") >= 2, text
    assert gpu_worker.returncode == 0 and cpu_worker.returncode == 0, text
