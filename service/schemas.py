"""Response bodies of the REST API (the worker protocol's live in `clrsearch.protocol`)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel


class TrialCounts(BaseModel):
    queued: int = 0
    running: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    stopped: int = 0


class TrialSummary(BaseModel):
    id: int
    number: int
    kind: str
    state: str
    value: float | None
    params: dict[str, Any]
    attempts: int
    infra_losses: int
    epochs_run: int
    worker_id: str | None
    error: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class StudySummary(BaseModel):
    id: int
    name: str
    state: str
    stop_reason: str | None
    objective: str
    direction: str
    sampler: str
    pruner: str
    n_trials: int
    parallelism: int
    # The search's trials (counted against n_trials); baselines and the range test apart.
    counts: TrialCounts
    other_counts: TrialCounts = TrialCounts()
    best_value: float | None
    created_at: dt.datetime
    updated_at: dt.datetime


class BaselineComparison(BaseModel):
    """Smith's headline figure: how many iterations the best CyclicLR trial needed to
    reach the final score of the best baseline run (epoch resolution)."""

    baseline_number: int
    baseline_schedule: str
    baseline_value: float
    baseline_iterations: int
    cyclic_number: int
    cyclic_value: float
    cyclic_iterations_to_reach: int | None
    iteration_ratio: float | None


class StudyDetail(StudySummary):
    spec: dict[str, Any]
    best_trial: TrialSummary | None
    baseline_comparison: BaselineComparison | None = None


class EpochView(BaseModel):
    epoch: int
    iterations: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    duration_s: float
    decision: str


class LrTrace(BaseModel):
    """The LR and momentum at each optimizer step, as run; thinned when long."""

    total_steps: int
    iterations: list[int]
    lr: list[float]
    momentum: list[float]


class TrialDetail(TrialSummary):
    study_name: str
    # A range test's curve and suggested bounds; None for other trials.
    result: dict[str, Any] | None = None
    epochs: list[EpochView]
    lr_trace: LrTrace


class TrialPage(BaseModel):
    total: int
    offset: int
    limit: int
    trials: list[TrialSummary]


class WorkerView(BaseModel):
    id: str
    host: str
    device: str
    last_seen_at: dt.datetime
    trial_id: int | None


class RangeTestView(BaseModel):
    """A study's LR range test: its state, the curve (thinned) and the bounds read off it."""

    study_name: str
    trial_number: int
    state: str
    error: str | None
    lrs: list[float]
    losses: list[float]
    diverged: bool
    base_lr: float | None
    max_lr: float | None
    loss_minimum_lr: float | None
