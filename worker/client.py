"""The worker's side of the worker protocol: JSON over HTTP with a bearer token.

Every call takes `patience_s`: how long to keep retrying, with exponential backoff,
while the server cannot be reached or answers 5xx. With `patience_s=0` a call is tried
once, for callers that have a fallback of their own (the spool, the next heartbeat, the
claim loop). Every call is idempotent on the server, so a retry after a lost answer
records nothing twice.

Errors: `LeaseLost` (HTTP 409: the trial is no longer this worker's), `ServerError`
(another 4xx: a retry cannot help), `ServerUnreachable` (no answer within the patience;
a 5xx, 408 or 429 answer counts as none).
"""

from __future__ import annotations

import logging
import time
from typing import Literal, TypeVar

import httpx
from pydantic import BaseModel

from clrsearch import protocol

logger = logging.getLogger(__name__)

Answer = TypeVar("Answer", bound=BaseModel)
# The calls that carry a result, and so may wait in the spool.
ResultCall = Literal["report", "complete", "fail"]

# The longest pause between two tries of one call.
MAX_RETRY_DELAY_S = 10.0
# Answers below 500 that still mean "try again later": a timeout, too many requests.
RETRY_STATUSES = (408, 429)


class LeaseLost(Exception):
    """Raised when the server says this worker no longer holds the trial (HTTP 409)."""


class ServerError(Exception):
    """Raised when the server refuses a call for a reason a retry cannot fix."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code

    @property
    def unauthorised(self) -> bool:
        """A token problem: the call itself is fine and may go through once it is fixed."""
        return self.status_code in (401, 403)


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

    def claim(
        self, request: protocol.ClaimRequest, patience_s: float | None = None
    ) -> protocol.ClaimResponse:
        return self._call("/claim", request, protocol.ClaimResponse, patience_s)

    def heartbeat(
        self, trial_id: int, lease_id: str, patience_s: float | None = None
    ) -> protocol.Decision:
        body = protocol.HeartbeatRequest(lease_id=lease_id)
        return self._call(f"/trials/{trial_id}/heartbeat", body, protocol.Decision, patience_s)

    def report(
        self, trial_id: int, report: protocol.EpochReport, patience_s: float | None = None
    ) -> protocol.Decision:
        return self._call(f"/trials/{trial_id}/report", report, protocol.Decision, patience_s)

    def complete(
        self, trial_id: int, body: protocol.CompleteRequest, patience_s: float | None = None
    ) -> protocol.Ack:
        return self._call(f"/trials/{trial_id}/complete", body, protocol.Ack, patience_s)

    def fail(
        self, trial_id: int, body: protocol.FailRequest, patience_s: float | None = None
    ) -> protocol.Ack:
        return self._call(f"/trials/{trial_id}/fail", body, protocol.Ack, patience_s)

    def send_result(
        self, call: ResultCall, trial_id: int, body: dict, patience_s: float | None = None
    ) -> protocol.Decision | protocol.Ack:
        """A report, complete or fail call from its JSON body (as kept in the spool)."""
        if call == "report":
            return self.report(trial_id, protocol.EpochReport.model_validate(body), patience_s)
        if call == "complete":
            return self.complete(
                trial_id, protocol.CompleteRequest.model_validate(body), patience_s
            )
        if call == "fail":
            return self.fail(trial_id, protocol.FailRequest.model_validate(body), patience_s)
        raise ValueError(f"unknown call {call!r}; expected report, complete or fail")

    def _call(
        self, path: str, body: BaseModel, answer: type[Answer], patience_s: float | None
    ) -> Answer:
        patience_s = self.patience_s if patience_s is None else patience_s
        deadline = time.monotonic() + patience_s
        delay_s = 0.5
        while True:
            try:
                # Unset optional fields stay out of the body, so that a server older than
                # a field (`claim_next`) reads the body it always has.
                response = self._http.post(path, content=body.model_dump_json(exclude_none=True),
                                           headers={"Content-Type": "application/json"})
            except httpx.TransportError as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 409:
                    raise LeaseLost(_detail(response))
                if response.status_code < 500 and response.status_code not in RETRY_STATUSES:
                    if response.status_code >= 400:
                        raise ServerError(
                            f"{path} refused with {response.status_code}: {_detail(response)}",
                            response.status_code,
                        )
                    return answer.model_validate_json(response.content)
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
            if time.monotonic() + delay_s > deadline:
                waited = f" for {patience_s:.0f} s" if patience_s > 0 else ""
                raise ServerUnreachable(f"{path} failed{waited}, last with {problem}")
            logger.warning("server call %s failed (%s); retrying in %.1f s", path, problem,
                           delay_s)
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, MAX_RETRY_DELAY_S)


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except (ValueError, AttributeError):  # not JSON, or JSON without a detail
        return response.text
