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
    # Where a checkpoint of each running trial is kept after every epoch, so that a retry
    # resumes where the lost attempt was. None: no checkpoints, a retry starts afresh. A
    # folder shared by all workers (a network volume) lets any worker resume any trial.
    checkpoint_dir: Path | None = None
    # Where results owed to an unreachable server wait (default: `data_dir / "spool"`).
    # Local to the machine: a worker started here later delivers what a dead one left.
    spool_dir: Path | None = None
    request_timeout_s: float = 30.0
    # How long to keep retrying the server before giving up on one call, for calls that
    # have no other fallback; results go to the spool instead and are never given up.
    server_patience_s: float = 300.0
    # Leave when the server has offered no trial for this long (None: wait for ever). Time
    # spent with the server unreachable does not count.
    max_idle_s: float | None = None
    torch_threads: int | None = None

    @property
    def spool_folder(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"
