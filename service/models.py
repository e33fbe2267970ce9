"""Our tables. Optuna keeps its own tables apart (see `service.optuna_bridge`)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Trial states. queued: waiting for a worker (a retry keeps its parameters); running:
# leased to one worker; the rest are final.
QUEUED, RUNNING, COMPLETE, PRUNED, FAILED, STOPPED = (
    "queued", "running", "complete", "pruned", "failed", "stopped"
)
FINAL_TRIAL_STATES = (COMPLETE, PRUNED, FAILED, STOPPED)
# Study states.
STUDY_RUNNING, STUDY_STOPPED, STUDY_COMPLETE = "running", "stopped", "complete"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[float]: JSON}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    direction: Mapped[str] = mapped_column(String(10))
    state: Mapped[str] = mapped_column(String(16), default=STUDY_RUNNING, index=True)
    stop_reason: Mapped[str | None] = mapped_column(Text)
    n_trials: Mapped[int] = mapped_column(Integer)
    parallelism: Mapped[int] = mapped_column(Integer)
    # The study's cyclic trials so far (its search budget used), kept here by `_add_trial`
    # under the study's lock so that a claim need not count them.
    cyclic_trials: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)

    trials: Mapped[list[Trial]] = relationship(back_populates="study")


class Trial(Base):
    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("study_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    # "cyclic" for a searched CyclicLR trial, "baseline" for a comparison run,
    # "range_test" for the LR range test of a study with lr_bounds "auto".
    kind: Mapped[str] = mapped_column(String(16), default="cyclic")
    # Only cyclic trials exist in Optuna; baselines and range tests never reach it.
    optuna_trial_id: Mapped[int | None] = mapped_column(Integer)
    optuna_number: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts lost to infrastructure (lapsed lease, worker shut down), not to training.
    infra_losses: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_id: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, index=True)
    value: Mapped[float | None] = mapped_column(Float)
    epochs_run: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    # What a range test measured and suggested (curve and bounds).
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    study: Mapped[Study] = relationship(back_populates="trials")
    epochs: Mapped[list[TrialEpoch]] = relationship(
        back_populates="trial", order_by="TrialEpoch.epoch"
    )


class TrialEpoch(Base):
    __tablename__ = "trial_epochs"
    __table_args__ = (UniqueConstraint("trial_id", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    iterations: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float] = mapped_column(Float)
    val_loss: Mapped[float] = mapped_column(Float)
    val_accuracy: Mapped[float] = mapped_column(Float)
    duration_s: Mapped[float] = mapped_column(Float)
    lrs: Mapped[list[float]] = mapped_column(JSON)
    momentums: Mapped[list[float]] = mapped_column(JSON)
    decision: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)

    trial: Mapped[Trial] = relationship(back_populates="epochs")


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(200))
    first_seen_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime)
    trial_id: Mapped[int | None] = mapped_column(Integer)
