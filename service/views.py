"""Read-only queries behind the dashboard: trial tables, charts, exports, worker health.

The dashboard's routes (`service.dashboard`) call these and only shape the answer; the SQL
lives here. Nothing here writes. Every chart is cut to a bounded size on the server (a
page of the table, a capped number of curves, traces thinned to `max_points`), so a
study of 10,000 trials costs the browser and the wire no more than one of 100.

Trials of kind "baseline" (a fixed or other non-cyclic schedule, run for comparison) are
kept out of everything that is about the CyclicLR search itself (history, curves, LR
schedules, parallel coordinates) and appear only in the trial table, the exports and
the comparison chart.

The schedule preview of a whole spec (`spec_centre`) is here too: it reads no table, but
it is the dashboard's own question, answered with the server's own rules.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel
from sqlalchemy import ColumnElement, DateTime, Float, func, literal, select
from sqlalchemy.orm import Session

from clrsearch.spec import (
    CyclicParams,
    FloatRange,
    StudySpec,
    geometric_centre,
    searched_params,
)
from service import domain, models
from service.db import db_now, is_sqlite
from service.errors import InvalidRequest, NotFound
from service.models import Study, Trial, TrialEpoch, Worker
from service.optuna_bridge import suggest_params
from service.schemas import StudyDetail
from service.settings import ServerSettings

CYCLIC, BASELINE = "cyclic", "baseline"
Metric = Literal["val_loss", "val_accuracy", "train_loss"]

# The CyclicLR parameters in the order torch's constructor takes them.
PARAM_ORDER = [name for name in CyclicParams.model_fields if name != "step_size_unit"]
# Learning rates span decades, so their axes are always logarithmic.
LOG_PARAMS = {"base_lr", "max_lr"}
_PLAIN_SORT_KEYS = ("number", "kind", "state", "value", "epochs_run", "attempts", "worker",
                    "duration", "started_at", "finished_at")
_NEVER_EMPTY = ("number", "kind", "state", "epochs_run", "attempts")
SORT_KEYS = _PLAIN_SORT_KEYS + tuple(f"params.{name}" for name in PARAM_ORDER)


# -- answers ------------------------------------------------------------------------------


class TrialRow(BaseModel):
    number: int
    kind: str
    state: str
    value: float | None
    params: dict[str, Any]
    epochs_run: int
    attempts: int
    worker_id: str | None
    duration_s: float | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: str | None


class TrialTable(BaseModel):
    total: int
    offset: int
    limit: int
    sort: str
    descending: bool
    state: str | None
    trials: list[TrialRow]


class StudyLive(BaseModel):
    """What the study page polls: the header's facts and a stamp that changes with data."""

    stamp: str
    study: StudyDetail
    param_columns: list[str]
    fixed_params: dict[str, Any]


class History(BaseModel):
    """Objective value of each complete CyclicLR trial, and the best value so far."""

    direction: str
    numbers: list[int]
    values: list[float]
    best_so_far: list[float]


class Curve(BaseModel):
    number: int
    state: str
    values: list[float | None]


class Curves(BaseModel):
    metric: str
    epochs: list[int]
    best_number: int | None
    total_trials: int
    curves: list[Curve]


class Schedule(BaseModel):
    number: int
    value: float | None
    total_steps: int
    lr: list[float | None]


class Schedules(BaseModel):
    iterations: list[int]
    schedules: list[Schedule]


class Axis(BaseModel):
    name: str
    kind: Literal["float", "choice"]
    log: bool
    categories: list[Any] | None = None


class ParallelLine(BaseModel):
    number: int
    value: float
    params: list[Any]


class Parallel(BaseModel):
    direction: str
    objective: str
    axes: list[Axis]
    best_number: int | None
    total_trials: int
    lines: list[ParallelLine]


class ComparedRun(BaseModel):
    number: int
    kind: str
    value: float | None
    params: dict[str, Any]
    values: list[float | None]


class Comparison(BaseModel):
    """The best CyclicLR trial against the best baseline run, epoch by epoch."""

    metric: str
    epochs: list[int]
    cyclic: ComparedRun | None
    baseline: ComparedRun


class WorkerHealth(BaseModel):
    id: str
    host: str
    device: str
    first_seen_at: dt.datetime
    last_seen_at: dt.datetime
    # The latest of its claims, heartbeats and reports (each report renews the lease).
    last_contact_at: dt.datetime
    last_contact_s_ago: float
    study_name: str | None
    trial_number: int | None
    lease_left_s: float | None
    # idle: holds nothing; healthy: renewed within two heartbeat intervals; late: it
    # missed heartbeats but the lease still holds; lapsed: the sweeper will retry it.
    health: Literal["idle", "healthy", "late", "lapsed"]


# -- the study page -----------------------------------------------------------------------


def study_live(session: Session, name: str) -> StudyLive:
    study = domain.get_study(session, name)
    spec = StudySpec.model_validate(study.spec)
    return StudyLive(
        stamp=_stamp(session, study),
        study=study,
        param_columns=param_columns(spec),
        fixed_params=fixed_params(spec),
    )


def param_columns(spec: StudySpec) -> list[str]:
    """The CyclicLR parameters that differ between trials, in torch's order.

    base_lr always differs when it is derived from a searched max_lr or lr_ratio, so the
    two learning rates are always shown.
    """
    searched = set(searched_params(spec.space)) | LOG_PARAMS
    if "step_size_up" in searched and spec.space.step_size_down is None:
        searched.discard("step_size_down")  # it follows step_size_up; no column of its own
    return [name for name in PARAM_ORDER if name in searched]


def fixed_params(spec: StudySpec) -> dict[str, Any]:
    """The CyclicLR settings every trial shares, for the header of the study page."""
    shown = set(param_columns(spec))
    fixed: dict[str, Any] = {"step_size_unit": spec.space.step_size_unit}
    for name in PARAM_ORDER:
        if name in shown:
            continue
        value = getattr(spec.space, name, None)
        if name == "step_size_down" and value is None:
            value = "same as step_size_up"
        elif name == "gamma" and value is None:
            value = 1.0
        fixed[name] = value
    return fixed


def trial_table(
    session: Session, name: str, *, offset: int = 0, limit: int = 50,
    state: str | None = None, sort: str = "number", descending: bool = True,
) -> TrialTable:
    """One page of trials, sorted on the server by any column, empty values last."""
    if sort not in SORT_KEYS:
        raise InvalidRequest(
            f"cannot sort trials by {sort!r}; choose one of {', '.join(SORT_KEYS)}"
        )
    study = _study(session, name)
    now = db_now(session)
    query = select(Trial).where(Trial.study_id == study.id)
    if state is not None:
        query = query.where(Trial.state == state)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    key = _sort_expression(session, sort, now)
    order = [key.desc() if descending else key.asc(), Trial.number]
    if sort not in _NEVER_EMPTY:
        order.insert(0, key.is_(None))  # empty values last, whichever the direction
    rows = session.scalars(query.order_by(*order).offset(offset).limit(limit)).all()
    return TrialTable(
        total=total, offset=offset, limit=limit, sort=sort, descending=descending,
        state=state, trials=[_trial_row(trial, now) for trial in rows],
    )


def history(session: Session, name: str) -> History:
    study = _study(session, name)
    rows = session.execute(
        select(Trial.number, Trial.value)
        .where(_searched(study), Trial.state == models.COMPLETE, Trial.value.is_not(None))
        .order_by(Trial.number)
    ).all()
    pick = min if study.direction == "minimize" else max
    best: list[float] = []
    for _, value in rows:
        best.append(value if not best else pick(best[-1], value))
    return History(
        direction=study.direction,
        numbers=[number for number, _ in rows],
        values=[value for _, value in rows],
        best_so_far=best,
    )


def learning_curves(
    session: Session, name: str, metric: Metric = "val_loss", max_trials: int = 300
) -> Curves:
    """A metric per epoch for each trial that ran an epoch.

    Beyond `max_trials` curves the chart is a solid block anyway, and each curve costs
    the browser a series; then the best trial, the running ones and the latest others
    are drawn.
    """
    study = _study(session, name)
    trials = session.execute(
        select(Trial.id, Trial.number, Trial.state)
        .where(_searched(study), Trial.epochs_run > 0)
        .order_by(Trial.number.desc())
    ).all()
    best = _best(session, study, CYCLIC)
    chosen = _choose_curves(trials, best.id if best else None, max_trials)
    values = _epoch_values(session, [trial_id for trial_id, _, _ in chosen], metric)
    last_epoch = max((epoch for per_trial in values.values() for epoch in per_trial), default=0)
    epochs = list(range(1, last_epoch + 1))
    curves = [
        Curve(number=number, state=state,
              values=[values.get(trial_id, {}).get(epoch) for epoch in epochs])
        for trial_id, number, state in sorted(chosen, key=lambda row: row[1])
    ]
    return Curves(
        metric=metric, epochs=epochs, best_number=best.number if best else None,
        total_trials=len(trials), curves=curves,
    )


def top_schedules(session: Session, name: str, top: int = 5, max_points: int = 1000
                  ) -> Schedules:
    """The LR at each step, as run, of the best `top` complete trials on one iteration grid.

    Every trace is sampled at the same iterations (thinned from the longest), so the
    chart can overlay them on one x axis.
    """
    study = _study(session, name)
    order = Trial.value.asc() if study.direction == "minimize" else Trial.value.desc()
    best = session.execute(
        select(Trial.id, Trial.number, Trial.value)
        .where(_searched(study), Trial.state == models.COMPLETE)
        .order_by(order, Trial.number).limit(top)
    ).all()
    traces: dict[int, list[float]] = {trial_id: [] for trial_id, _, _ in best}
    for trial_id, lrs in session.execute(
        select(TrialEpoch.trial_id, TrialEpoch.lrs)
        .where(TrialEpoch.trial_id.in_(list(traces)))
        .order_by(TrialEpoch.trial_id, TrialEpoch.epoch)
    ).all():
        traces[trial_id].extend(lrs)
    longest = max((len(trace) for trace in traces.values()), default=0)
    steps = domain.thin_indices(longest, max_points)
    return Schedules(
        iterations=steps,
        schedules=[
            Schedule(
                number=number, value=value, total_steps=len(traces[trial_id]),
                lr=[traces[trial_id][i] if i < len(traces[trial_id]) else None
                    for i in steps],
            )
            for trial_id, number, value in best
        ],
    )


def parallel_coordinates(session: Session, name: str, max_trials: int = 2000) -> Parallel:
    """Complete trials as lines across one axis per varying parameter, then the objective.

    Beyond `max_trials` lines an even sample over trial numbers is drawn, best included.
    """
    study = _study(session, name)
    spec = StudySpec.model_validate(study.spec)
    axes = [_axis(spec, column) for column in param_columns(spec)]
    rows = session.execute(
        select(Trial.number, Trial.value, Trial.params)
        .where(_searched(study), Trial.state == models.COMPLETE, Trial.value.is_not(None))
        .order_by(Trial.number)
    ).all()
    best = _best(session, study, CYCLIC)
    keep = set(domain.thin_indices(len(rows), max_trials))
    lines = [
        ParallelLine(number=number, value=value,
                     params=[params.get(axis.name) for axis in axes])
        for index, (number, value, params) in enumerate(rows)
        if index in keep or (best is not None and number == best.number)
    ]
    for position, axis in enumerate(axes):
        if axis.kind == "choice" and axis.categories is None:
            axis.categories = sorted({line.params[position] for line in lines}, key=str)
    return Parallel(
        direction=study.direction, objective=spec.objective, axes=axes,
        best_number=best.number if best else None, total_trials=len(rows), lines=lines,
    )


def baseline_comparison(session: Session, name: str) -> Comparison | None:
    """The objective per epoch of the best CyclicLR and the best baseline; None without one."""
    study = _study(session, name)
    baseline = _best(session, study, BASELINE)
    if baseline is None:
        return None
    cyclic = _best(session, study, CYCLIC)
    metric = StudySpec.model_validate(study.spec).objective
    runs = [trial for trial in (cyclic, baseline) if trial is not None]
    values = _epoch_values(session, [trial.id for trial in runs], metric)
    last_epoch = max((epoch for per_trial in values.values() for epoch in per_trial), default=0)
    epochs = list(range(1, last_epoch + 1))

    def compared(trial: Trial) -> ComparedRun:
        return ComparedRun(
            number=trial.number, kind=trial.kind, value=trial.value, params=trial.params,
            values=[values.get(trial.id, {}).get(epoch) for epoch in epochs],
        )

    return Comparison(
        metric=metric, epochs=epochs,
        cyclic=compared(cyclic) if cyclic else None, baseline=compared(baseline),
    )


def importance_spec(session: Session, name: str) -> tuple[StudySpec, int]:
    """The spec to hand Optuna's importance evaluator, and the complete-trial count.

    The count lets the caller reuse an answer until another trial completes.
    """
    study = _study(session, name)
    complete = session.scalar(
        select(func.count()).where(_searched(study), Trial.state == models.COMPLETE)
    ) or 0
    return StudySpec.model_validate(study.spec), complete


# -- schedule previews --------------------------------------------------------------------


def spec_centre(spec: StudySpec) -> CyclicParams:
    """The trial at the centre of a spec's space: each range at its geometric centre (the
    midpoint when it reaches 0 or below), each choice at its first option.

    The values go through the sampler's own mapping (`suggest_params`), so the preview is
    a point the search can really draw: base_lr derived from lr_ratio, gamma applied only
    to exp_range, exactly as a trial gets them.
    """
    return suggest_params(_CentreTrial(), spec.space)  # type: ignore[arg-type]


class _CentreTrial:
    """Answers `suggest_params`'s questions with the centre of each range, asking no
    sampler: the two methods it calls, with Optuna's signatures."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        return geometric_centre(FloatRange(low=low, high=high, log=log))

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return choices[0]


# -- exports ------------------------------------------------------------------------------


def export_rows(session: Session, name: str) -> list[dict[str, Any]]:
    """Every trial of a study, flat: one dict per trial, parameters as `params.<name>`."""
    study = _study(session, name)
    now = db_now(session)
    trials = session.scalars(
        select(Trial).where(Trial.study_id == study.id).order_by(Trial.number)
    ).all()
    rows = []
    for trial in trials:
        row = _trial_row(trial, now).model_dump(mode="json")
        params = row.pop("params")
        row.update({f"params.{key}": value for key, value in params.items()})
        rows.append(row)
    return rows


def export_csv(rows: Sequence[dict[str, Any]]) -> str:
    fixed = list(TrialRow.model_fields)
    fixed.remove("params")
    param_keys = sorted({key for row in rows for key in row if key.startswith("params.")})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fixed + param_keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# -- workers ------------------------------------------------------------------------------


def workers_with_leases(session: Session, settings: ServerSettings) -> list[WorkerHealth]:
    now = db_now(session)
    rows = session.execute(
        select(Worker, Trial, Study.name)
        .outerjoin(Trial, Trial.id == Worker.trial_id)
        .outerjoin(Study, Study.id == Trial.study_id)
        .order_by(Worker.id)
    ).all()
    return [_worker_health(worker, trial, study_name, now, settings)
            for worker, trial, study_name in rows]


def _worker_health(
    worker: Worker, trial: Trial | None, study_name: str | None, now: dt.datetime,
    settings: ServerSettings,
) -> WorkerHealth:
    # The worker row keeps the id of its last trial until the trial is released; only a
    # running trial leased to this very worker counts as held.
    held = (trial is not None and trial.state == models.RUNNING
            and trial.worker_id == worker.id and trial.lease_expires_at is not None)
    lease_left_s = None
    last_contact = worker.last_seen_at
    health: Literal["idle", "healthy", "late", "lapsed"] = "idle"
    if held:
        assert trial is not None and trial.lease_expires_at is not None
        lease_left_s = (trial.lease_expires_at - now).total_seconds()
        renewed = trial.lease_expires_at - dt.timedelta(seconds=settings.lease_s)
        last_contact = max(last_contact, renewed)
        since_renewal_s = settings.lease_s - lease_left_s
        if lease_left_s <= 0:
            health = "lapsed"
        elif since_renewal_s > 2 * settings.heartbeat_s:
            health = "late"
        else:
            health = "healthy"
    return WorkerHealth(
        id=worker.id, host=worker.host, device=worker.device,
        first_seen_at=worker.first_seen_at, last_seen_at=worker.last_seen_at,
        last_contact_at=last_contact,
        last_contact_s_ago=max(0.0, (now - last_contact).total_seconds()),
        study_name=study_name if held else None,
        trial_number=trial.number if held and trial is not None else None,
        lease_left_s=lease_left_s, health=health,
    )


# -- helpers ------------------------------------------------------------------------------


def _study(session: Session, name: str) -> Study:
    study = session.scalar(select(Study).where(Study.name == name))
    if study is None:
        raise NotFound(f"no study named {name!r}; the studies page lists them all")
    return study


def _searched(study: Study) -> ColumnElement[bool]:
    return (Trial.study_id == study.id) & (Trial.kind == CYCLIC)


def _best(session: Session, study: Study, kind: str) -> Trial | None:
    order = Trial.value.asc() if study.direction == "minimize" else Trial.value.desc()
    return session.scalar(
        select(Trial)
        .where(Trial.study_id == study.id, Trial.kind == kind,
               Trial.state == models.COMPLETE, Trial.value.is_not(None))
        .order_by(order, Trial.number).limit(1)
    )


def _stamp(session: Session, study: StudyDetail) -> str:
    """Changes whenever anything the study page shows may have changed.

    Counts by state catch trials that start and end; the newest epoch row (global, so it
    is one index lookup) catches every report; the latest start catches a retry that
    leaves the counts as they were.
    """
    newest_epoch = session.scalar(select(func.max(TrialEpoch.id))) or 0
    latest_start = session.scalar(
        select(func.max(Trial.started_at)).where(Trial.study_id == study.id)
    )
    tallies = ".".join(
        str(getattr(counts, state))
        for counts in (study.counts, study.other_counts)
        for state in ("queued", "running", "complete", "pruned", "failed", "stopped")
    )
    return f"{study.state}:{tallies}:{newest_epoch}:{latest_start}"


def _trial_row(trial: Trial, now: dt.datetime) -> TrialRow:
    duration_s = None
    if trial.started_at is not None:
        duration_s = ((trial.finished_at or now) - trial.started_at).total_seconds()
    return TrialRow(
        number=trial.number, kind=trial.kind, state=trial.state, value=trial.value,
        params=trial.params, epochs_run=trial.epochs_run, attempts=trial.attempts,
        worker_id=trial.worker_id, duration_s=duration_s, started_at=trial.started_at,
        finished_at=trial.finished_at, error=trial.error,
    )


def _sort_expression(session: Session, sort: str, now: dt.datetime) -> ColumnElement[Any]:
    if sort.startswith("params."):
        element = Trial.params[sort.removeprefix("params.")]
        if sort in ("params.mode", "params.scale_mode"):
            return element.as_string()
        if sort == "params.cycle_momentum":
            return element.as_boolean()
        return element.as_float()
    if sort == "duration":
        # A running trial's duration so far, so that long runners sort with long trials.
        end = func.coalesce(Trial.finished_at, literal(now, DateTime))
        if is_sqlite(session.get_bind()):
            return (func.julianday(end) - func.julianday(Trial.started_at)) * 86400.0
        return func.extract("epoch", end - Trial.started_at).cast(Float)
    if sort == "worker":
        return Trial.worker_id
    return getattr(Trial, sort)


def _choose_curves(
    trials: Sequence[Any], best_id: int | None, max_trials: int
) -> list[tuple[int, int, str]]:
    """The trials whose curves are drawn: all of them, or the best, running and latest."""
    rows = [(trial_id, number, state) for trial_id, number, state in trials]
    if len(rows) <= max_trials:
        return rows
    first = [row for row in rows if row[0] == best_id or row[2] == models.RUNNING]
    chosen = first[:max_trials]
    taken = {row[0] for row in chosen}
    for row in rows:  # newest first
        if len(chosen) >= max_trials:
            break
        if row[0] not in taken:
            chosen.append(row)
            taken.add(row[0])
    return chosen


def _epoch_values(
    session: Session, trial_ids: Sequence[int], metric: str
) -> dict[int, dict[int, float]]:
    """{trial id: {epoch: metric}}, reading only the columns needed, not the LR lists."""
    if not trial_ids:
        return {}
    column = getattr(TrialEpoch, metric)
    values: dict[int, dict[int, float]] = {}
    for trial_id, epoch, value in session.execute(
        select(TrialEpoch.trial_id, TrialEpoch.epoch, column)
        .where(TrialEpoch.trial_id.in_(list(trial_ids)))
    ).all():
        values.setdefault(trial_id, {})[epoch] = value
    return values


def _axis(spec: StudySpec, name: str) -> Axis:
    value = getattr(spec.space, name, None)
    if isinstance(value, list) or name in ("mode", "scale_mode", "cycle_momentum"):
        categories = list(value) if isinstance(value, list) else None
        return Axis(name=name, kind="choice", log=False, categories=categories)
    log = name in LOG_PARAMS or (isinstance(value, FloatRange) and value.log)
    return Axis(name=name, kind="float", log=log)
