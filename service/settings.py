"""Server settings, read from `CLRSEARCH_*` environment variables."""

from __future__ import annotations

import ipaddress

from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///clrsearch.db"


def normalise_database_url(url: str) -> str:
    """Point plain PostgreSQL URLs at psycopg 3, the driver clrsearch ships with."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerSettings(BaseSettings):
    """Everything the server needs; the defaults run a local demo with no set-up."""

    model_config = SettingsConfigDict(env_prefix="CLRSEARCH_", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = 8000
    # A lease not renewed within lease_s lapses and its trial is retried elsewhere.
    lease_s: float = 120.0
    heartbeat_s: float = 15.0
    claim_retry_s: float = 2.0
    sweep_interval_s: float = 10.0
    admin_token: SecretStr | None = None
    worker_token: SecretStr | None = None
    read_token: SecretStr | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    # Sample each study's next trial in a second process before it is claimed
    # (`service.proposer`). Off by default: with it a seeded study is not repeatable
    # (drafts take the sampler's random numbers in an order that depends on timing), and
    # claims are a small part of a GPU trial. Off, every claim samples as plain Optuna.
    ask_ahead: bool = False
    insecure: bool = False

    @field_validator("database_url")
    @classmethod
    def _normalise(cls, value: str) -> str:
        return normalise_database_url(value)

    @field_validator("heartbeat_s", "lease_s", "claim_retry_s", "sweep_interval_s")
    @classmethod
    def _positive(cls, value: float, info) -> float:
        if value <= 0:
            raise ValueError(f"CLRSEARCH_{info.field_name.upper()} must be positive, got {value}")
        return value

    def check_exposure(self) -> None:
        """Refuse to serve a non-loopback address without tokens, unless told --insecure."""
        if is_loopback(self.host) or self.insecure:
            return
        missing = [
            name
            for name in ("admin_token", "worker_token")
            if getattr(self, name) is None
        ]
        if missing:
            env = ", ".join(f"CLRSEARCH_{name.upper()}" for name in missing)
            raise ValueError(
                f"refusing to listen on {self.host} without tokens: set {env}, "
                "or pass --insecure to serve an open API on a trusted network"
            )
