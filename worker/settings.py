"""Worker settings, read from `CLRSEARCH_*` environment variables."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
    """What a worker needs: the server's URL and, when the server has one, the worker token."""

    model_config = SettingsConfigDict(env_prefix="CLRSEARCH_", extra="ignore")

    server_url: str = "http://127.0.0.1:8000"
    worker_token: SecretStr | None = None
    # A stable id lets a restarted worker get back the trial it held.
    worker_id: str = f"{socket.gethostname()}-{os.getpid()}"
    device: str = "auto"
    data_dir: Path = Path("data")
    request_timeout_s: float = 30.0
    # How long to keep retrying the server before giving up on one call.
    server_patience_s: float = 300.0
    # Leave when no trial has been offered for this long (None: wait for ever).
    max_idle_s: float | None = None
    torch_threads: int | None = None
