"""Read the compose files as Docker Compose would: YAML with Compose's tags, variables
interpolated from an `.env`, override files merged. Enough of the Compose specification
for our own files, so that tests can check them and run what they describe.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker-compose.cpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA = ROOT / "tests" / "data" / "compose-spec" / "compose-spec.json"

# Attributes an override replaces instead of merging (Compose's merge rules).
REPLACED = {"command", "entrypoint", "test"}

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?+])(?P<argument>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


@dataclass(frozen=True)
class Reset:
    """`!reset`: the attribute is removed from what came before."""

    value: Any


@dataclass(frozen=True)
class Override:
    """`!override`: the attribute replaces what came before instead of merging with it."""

    value: Any


class MissingVariable(ValueError):
    pass


class _ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(kind: type):
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return kind(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return kind(loader.construct_sequence(node, deep=True))
        return kind(loader.construct_scalar(node))

    return construct


_ComposeLoader.add_constructor("!reset", _tagged(Reset))
_ComposeLoader.add_constructor("!override", _tagged(Override))


def load_yaml(path: Path) -> dict[str, Any]:
    # A SafeLoader that also knows Compose's `!reset` and `!override`.
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines, as Compose reads `.env`; comments and blank lines skipped."""
    variables = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            variables[key.strip()] = value.strip()
    return variables


def referenced_variables(text: str) -> set[str]:
    return {match["braced"] or match["named"] for match in _VARIABLE.finditer(text)
            if not match["escaped"]}


def interpolate(value: Any, variables: Mapping[str, str]) -> Any:
    """Substitute ${VAR}, ${VAR:-default}, ${VAR:?error} and the like, everywhere."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if isinstance(value, Reset | Override):
        return type(value)(interpolate(value.value, variables))
    if isinstance(value, str):
        return _VARIABLE.sub(lambda match: _substitute(match, variables), value)
    return value


def _substitute(match: re.Match[str], variables: Mapping[str, str]) -> str:
    if match["escaped"]:
        return "$"
    name = match["braced"] or match["named"]
    operator, argument = match["operator"], match["argument"] or ""
    value = variables.get(name)
    is_set = value is not None
    is_full = bool(value)
    present = is_full if operator and operator.startswith(":") else is_set
    if operator in (":-", "-"):
        return value if present else argument
    if operator in (":?", "?"):
        if not present:
            raise MissingVariable(f"required variable {name} is missing a value: {argument}")
        return value
    if operator in (":+", "+"):
        return argument if present else ""
    return value or ""


def merge(base: Any, override: Any, key: str | None = None) -> Any:
    """The model Compose builds from `-f base -f override`."""
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict) and key not in REPLACED:
        merged = dict(base)
        for name, value in override.items():
            if isinstance(value, Reset):
                merged.pop(name, None)
            elif name in merged:
                merged[name] = merge(merged[name], value, name)
            else:
                merged[name] = value.value if isinstance(value, Override) else value
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED:
        return base + override
    return override


def compose_model(variables: Mapping[str, str], *overrides: Path) -> dict[str, Any]:
    model = load_yaml(COMPOSE_FILE)
    for path in overrides:
        model = merge(model, load_yaml(path))
    return interpolate(model, variables)


def service_environment(service: Mapping[str, Any], variables: Mapping[str, str]
                        ) -> dict[str, str]:
    """A service's container environment: valueless entries come from `.env`, or not at all."""
    declared = service.get("environment") or {}
    if isinstance(declared, list):
        declared = dict(item.split("=", 1) if "=" in item else (item, None) for item in declared)
    environment = {}
    for name, value in declared.items():
        if value is None:
            if variables.get(name) is not None:
                environment[name] = variables[name]
        else:
            environment[name] = str(value)
    return environment


def compose_schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())


def validate_compose(model: Mapping[str, Any]) -> None:
    """Raise jsonschema.ValidationError where the model breaks the Compose specification."""
    # Named, not looked up: the schema's `$schema` spells draft 2019-09's address in a way
    # jsonschema does not recognise.
    validator = jsonschema.Draft201909Validator(compose_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(model))
    if error is not None:
        raise error


def dockerfile_stages(text: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions as (INSTRUCTION, arguments), continuation lines joined."""
    text = DOCKERFILE.read_text() if text is None else text
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            name = arguments.split(" AS ")[-1].strip() if " AS " in arguments else arguments
            current = stages.setdefault(name, [])
        current.append((instruction, arguments.strip()))
    return stages


def stage_parents(stages: Mapping[str, list[tuple[str, str]]], stage: str) -> list[str]:
    """The stage and those it is built FROM, nearest first."""
    chain = [stage]
    while True:
        parent = stages[chain[-1]][0][1].split(" AS ")[0].strip()
        if parent not in stages:
            return chain
        chain.append(parent)


def stage_setting(stages: Mapping[str, list[tuple[str, str]]], stage: str,
                  instruction: str) -> str | None:
    """The last INSTRUCTION a target inherits (USER, ENTRYPOINT, CMD, HEALTHCHECK)."""
    for name in stage_parents(stages, stage):
        found = [arguments for kind, arguments in stages[name] if kind == instruction]
        if found:
            return found[-1]
    return None


def image_environment(stages: Mapping[str, list[tuple[str, str]]], target: str,
                      prefix: str = "CLRSEARCH_") -> dict[str, str]:
    """The ENV a target's image sets, its parents' first, for names with the prefix."""
    environment: dict[str, str] = {}
    for name in reversed(stage_parents(stages, target)):
        for instruction, arguments in stages[name]:
            if instruction == "ENV":
                for pair in arguments.split():
                    key, _, value = pair.partition("=")
                    if key.startswith(prefix):
                        environment[key] = value
    return environment


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form instruction (`CMD [...]`, `HEALTHCHECK ... CMD [...]`)."""
    return json.loads(arguments[arguments.index("["):])
