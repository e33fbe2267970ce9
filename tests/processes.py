"""Start the real thing for tests: `clrsearch serve` and `clrsearch worker` processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clrsearch(*args: str, log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "clrsearch", *args], stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd,
        )


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path,
                 timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server did not become healthy:\n{log.read_text()}")


def wait_for_study(url: str, name: str, timeout_s: float, headers: dict[str, str] | None = None
                   ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    study: dict[str, Any] = {}
    while time.monotonic() < deadline:
        study = httpx.get(f"{url}/api/v1/studies/{name}", headers=headers, timeout=10).json()
        if study["state"] != "running":
            return study
        time.sleep(0.5)
    raise AssertionError(f"study {name} still running after {timeout_s} s: {study}")


def stop(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
