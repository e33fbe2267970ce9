"""Wire schemas of the worker protocol (claim, heartbeat, report, complete, fail).

Shared by the server and the workers; imports only pydantic and `clrsearch.spec`.

| call                          | body            | answer            |
|-------------------------------|-----------------|-------------------|
| POST /api/v1/worker/claim     | ClaimRequest    | ClaimResponse     |
| POST .../trials/{id}/heartbeat| HeartbeatRequest| Decision          |
| POST .../trials/{id}/report   | EpochReport     | Decision          |
| POST .../trials/{id}/complete | CompleteRequest | Ack               |
| POST .../trials/{id}/fail     | FailRequest     | Ack               |

Every call after claim carries the `lease_id` it was given, so that a worker whose
lease lapsed and whose trial went to another worker is told so instead of writing
over the new holder's results.

A completion may carry the worker's next claim (`claim_next`): the server records the
completion, commits it, then answers the claim in `Ack.next`, as `/claim` would. The
worker starts its next trial one round trip sooner, and the server still hears how a
trial ended before it hands out the next one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from clrsearch.spec import BaselineParams, CyclicParams, Objective, RangeTestSpec, TaskSpec

Action = Literal["continue", "prune", "stop"]
# cyclic: a searched CyclicLR trial; baseline: a comparison run with another schedule;
# range_test: Smith's LR range test, run once before a study with lr_bounds "auto".
TrialKind = Literal["cyclic", "baseline", "range_test"]
# Names travel into logs and database columns: no control characters in them.
NAME_PATTERN = r"^[^\x00-\x1f\x7f]*$"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ClaimRequest(_Wire):
    worker_id: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN)
    host: str = Field("", max_length=200, pattern=NAME_PATTERN)
    device: str = Field("cpu", max_length=200, pattern=NAME_PATTERN)


class TrialAssignment(_Wire):
    trial_id: int
    lease_id: str
    study_name: str
    number: int
    attempt: int
    kind: TrialKind = "cyclic"
    # Exactly one of these is set, matching `kind`.
    params: CyclicParams | None = None
    baseline: BaselineParams | None = None
    range_test: RangeTestSpec | None = None
    task: TaskSpec
    objective: Objective
    lease_s: float
    heartbeat_s: float


class ClaimResponse(_Wire):
    trial: TrialAssignment | None = None
    retry_after_s: float = 0.0


class HeartbeatRequest(_Wire):
    lease_id: str


class EpochReport(_Wire):
    """One epoch's results. Repeating the same epoch records nothing new."""

    lease_id: str
    epoch: int = Field(ge=1)
    # Optimizer steps done since the trial started, at the end of this epoch.
    iterations: int = Field(ge=0)
    train_loss: float
    val_loss: float
    val_accuracy: float = Field(ge=0, le=1)
    duration_s: float = Field(ge=0)
    # The LR and momentum applied at each optimizer step of this epoch, as run.
    lrs: list[float] = Field(default_factory=list, max_length=1_000_000)
    momentums: list[float] = Field(default_factory=list, max_length=1_000_000)


class Decision(_Wire):
    action: Action
    reason: str = ""


class RangeTestCurve(_Wire):
    """What a range test measured: the LR and smoothed training loss at each step."""

    lrs: list[float] = Field(min_length=2, max_length=1_000_000)
    losses: list[float] = Field(min_length=2, max_length=1_000_000)
    diverged: bool = False


class CompleteRequest(_Wire):
    lease_id: str
    value: float
    pruned: bool = False
    stopped: bool = False
    # Set by range-test trials only.
    range_test: RangeTestCurve | None = None
    # The worker's next claim, answered in `Ack.next` once the completion is committed.
    # Sent only by a worker that will run what it is given: never kept in the spool.
    claim_next: ClaimRequest | None = None


class FailRequest(_Wire):
    lease_id: str
    error: str = Field(max_length=20000)

    @field_validator("error")
    @classmethod
    def _drop_nul(cls, value: str) -> str:
        # A NUL byte cannot be stored in PostgreSQL text; it carries nothing for a reader.
        return value.replace("\x00", "")
    # True for losses that a retry on another worker may fix (the worker was asked to
    # shut down, the device vanished); False for errors in training itself.
    retryable: bool = False


class Ack(_Wire):
    recorded: bool
    state: str
    # The answer to `CompleteRequest.claim_next`, when the completion carried one.
    next: ClaimResponse | None = None
