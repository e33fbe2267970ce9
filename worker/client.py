"""The worker's side of the worker protocol: JSON over HTTP with a bearer token.

Calls that fail because the server cannot be reached are retried with exponential
backoff for up to `patience_s`; every call is idempotent on the server, so a retry
after a lost answer records nothing twice.
"""

from __future__ import annotations

import logging
import time
from typing import TypeVar

import httpx
from pydantic import BaseModel

from clrsearch import protocol

logger = logging.getLogger(__name__)

Answer = TypeVar("Answer", bound=BaseModel)


class LeaseLost(Exception):
    """Raised when the server says this worker no longer holds the trial (HTTP 409)."""


class ServerError(Exception):
    """Raised when the server refuses a call for a reason a retry cannot fix."""


class ServerUnreachable(Exception):
    """Raised when the server did not answer within the worker's patience."""


class WorkerClient:
    def __init__(
        self, server_url: str, token: str | None = None, timeout_s: float = 30.0,
        patience_s: float = 300.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=server_url.rstrip("/") + "/api/v1/worker", headers=headers,
            timeout=timeout_s,
        )
        self.patience_s = patience_s

    def close(self) -> None:
        self._http.close()

    def claim(self, request: protocol.ClaimRequest) -> protocol.ClaimResponse:
        return self._call("/claim", request, protocol.ClaimResponse)

    def heartbeat(self, trial_id: int, lease_id: str) -> protocol.Decision:
        body = protocol.HeartbeatRequest(lease_id=lease_id)
        return self._call(f"/trials/{trial_id}/heartbeat", body, protocol.Decision)

    def report(self, trial_id: int, report: protocol.EpochReport) -> protocol.Decision:
        return self._call(f"/trials/{trial_id}/report", report, protocol.Decision)

    def complete(self, trial_id: int, body: protocol.CompleteRequest) -> protocol.Ack:
        return self._call(f"/trials/{trial_id}/complete", body, protocol.Ack)

    def fail(self, trial_id: int, body: protocol.FailRequest) -> protocol.Ack:
        return self._call(f"/trials/{trial_id}/fail", body, protocol.Ack)

    def _call(self, path: str, body: BaseModel, answer: type[Answer]) -> Answer:
        deadline = time.monotonic() + self.patience_s
        delay_s = 0.5
        while True:
            try:
                response = self._http.post(path, content=body.model_dump_json(),
                                           headers={"Content-Type": "application/json"})
            except httpx.TransportError as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 409:
                    raise LeaseLost(response.json().get("detail", response.text))
                if response.status_code < 500:
                    if response.status_code >= 400:
                        raise ServerError(
                            f"{path} refused with {response.status_code}: {response.text}"
                        )
                    return answer.model_validate_json(response.content)
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
            if time.monotonic() + delay_s > deadline:
                raise ServerUnreachable(
                    f"{path} failed for {self.patience_s:.0f} s, last with {problem}"
                )
            logger.warning("server call %s failed (%s); retrying in %.1f s", path, problem,
                           delay_s)
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 10.0)
