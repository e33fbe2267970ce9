"""Domain operations: what happens to studies and trials. Routes call these; they hold
the SQL and the rules, and call Optuna only through `OptunaBridge`.

Every function takes the request's session and never commits: `db.unit_of_work`
commits once per request. Claims are serialised per study by a row lock on the study
(`SELECT ... FOR UPDATE` on PostgreSQL; on SQLite every transaction is `BEGIN
IMMEDIATE`, one writer at a time), so no study exceeds its parallelism or its trial
budget whatever the number of workers and server processes. Leases are timed by the
database clock.

A function that may change Optuna's data (claim, report, complete, fail, stop, the lease
sweep) first takes Optuna's journal (`OptunaBridge.lock_journal`), before any row lock:
the journal is written in the same transaction, and taking it first means no two
transactions ever wait for each other's locks.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import secrets
from collections import Counter
from collections.abc import Sequence

from sqlalchemy import ColumnElement, Row, bindparam, exists, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, joinedload
from sqlalchemy.sql.dml import ReturningInsert

from clrsearch import protocol
from clrsearch.cycles import cycle_length, is_cycle_end
from clrsearch.lr_bounds import CurveTooFlat, space_around, suggest_bounds
from clrsearch.spec import BaselineParams, CyclicParams, RangeTestSpec, StudySpec
from service import models
from service.db import db_now, is_sqlite
from service.errors import InvalidRequest, LeaseLost, NotFound, StudyExists
from service.models import Study, Trial, TrialEpoch, Worker
from service.optuna_bridge import OptunaBridge, Proposal
from service.schemas import (
    BaselineComparison,
    EpochView,
    LrTrace,
    RangeTestView,
    StudyDetail,
    StudySummary,
    TrialCounts,
    TrialDetail,
    TrialPage,
    TrialSummary,
    WorkerView,
)
from service.settings import ServerSettings

logger = logging.getLogger(__name__)

DEFAULT_TRACE_POINTS = 2000
# Study summaries count the search's own trials against the budget, and the comparison
# runs (baselines, the range test) apart.
SEARCH_KINDS = ("cyclic",)
OTHER_KINDS = ("baseline", "range_test")
# Our tables as SQL Core sees them, for the worker protocol's statements built once.
_TRIALS, _STUDIES = Trial.__table__, Study.__table__


# -- studies ------------------------------------------------------------------------------


def create_study(session: Session, bridge: OptunaBridge, spec: StudySpec) -> StudyDetail:
    bridge.lock_journal(session)
    if session.scalar(select(Study.id).where(Study.name == spec.name)) is not None:
        raise StudyExists(
            f"a study named {spec.name!r} already exists; choose another name"
        )
    now = db_now(session)
    study = Study(
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        direction="minimize" if spec.objective == "val_loss" else "maximize",
        state=models.STUDY_RUNNING,
        n_trials=spec.n_trials,
        parallelism=spec.parallelism,
        created_at=now,
        updated_at=now,
    )
    session.add(study)
    session.flush()
    if spec.lr_bounds == "auto":
        _add_trial(session, study, "range_test", spec.range_test.model_dump(mode="json"), now)
    else:
        _add_baselines(session, study, spec, now)
    bridge.create_study(spec)
    logger.info(
        "study %r created: %d trials, %d at a time, sampler %s",
        spec.name, spec.n_trials, spec.parallelism, spec.sampler,
    )
    return _study_detail(session, study)


def list_studies(session: Session) -> list[StudySummary]:
    studies = session.scalars(select(Study).order_by(Study.id)).all()
    ids = [study.id for study in studies]
    counts = _counts_by_study(session, ids, SEARCH_KINDS)
    others = _counts_by_study(session, ids, OTHER_KINDS)
    best = _best_values(session, studies)
    return [
        _study_summary(study, counts.get(study.id, TrialCounts()),
                       others.get(study.id, TrialCounts()), best.get(study.id))
        for study in studies
    ]


def get_study(session: Session, name: str) -> StudyDetail:
    return _study_detail(session, _study_by_name(session, name))


def stop_study(
    session: Session, bridge: OptunaBridge, name: str, reason: str = "stopped by a person"
) -> StudyDetail:
    bridge.lock_journal(session)
    study = _study_by_name(session, name, lock=True)
    if study.state == models.STUDY_RUNNING:
        _stop(session, bridge, study, db_now(session), reason)
    return _study_detail(session, study)


def _stop(
    session: Session, bridge: OptunaBridge, study: Study, now: dt.datetime, reason: str
) -> None:
    study.state = models.STUDY_STOPPED
    study.stop_reason = reason
    study.updated_at = now
    spec = _spec(study)
    queued = session.scalars(
        select(Trial).where(Trial.study_id == study.id, Trial.state == models.QUEUED)
    ).all()
    for trial in queued:
        _finish(session, bridge, spec, trial, models.STOPPED, now, error=reason)
    # Running trials hear of it at their next heartbeat or report and end as stopped.
    log = logger.warning if "failed" in reason else logger.info
    log("study %r stopped: %s", study.name, reason)


def best_trial(session: Session, name: str) -> TrialSummary:
    study = _study_by_name(session, name)
    trial = _best_trial_row(session, study)
    if trial is None:
        raise NotFound(f"study {name!r} has no complete trial yet")
    return _trial_summary(trial)


def list_trials(
    session: Session, name: str, *, offset: int, limit: int, state: str | None
) -> TrialPage:
    study = _study_by_name(session, name)
    query = select(Trial).where(Trial.study_id == study.id)
    if state is not None:
        query = query.where(Trial.state == state)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.scalars(query.order_by(Trial.number).offset(offset).limit(limit)).all()
    return TrialPage(
        total=total or 0, offset=offset, limit=limit,
        trials=[_trial_summary(trial) for trial in rows],
    )


def get_trial(
    session: Session, name: str, number: int, max_points: int = DEFAULT_TRACE_POINTS
) -> TrialDetail:
    study = _study_by_name(session, name)
    trial = session.scalar(
        select(Trial).where(Trial.study_id == study.id, Trial.number == number)
    )
    if trial is None:
        raise NotFound(f"study {name!r} has no trial number {number}")
    epochs = trial.epochs
    lrs = [lr for epoch in epochs for lr in epoch.lrs]
    momentums = [momentum for epoch in epochs for momentum in epoch.momentums]
    steps = thin_indices(len(lrs), max_points)
    return TrialDetail(
        **_trial_summary(trial).model_dump(),
        study_name=study.name,
        result=trial.result,
        epochs=[EpochView.model_validate(epoch, from_attributes=True) for epoch in epochs],
        lr_trace=LrTrace(
            total_steps=len(lrs),
            iterations=steps,
            lr=[lrs[i] for i in steps],
            momentum=[momentums[i] for i in steps if i < len(momentums)],
        ),
    )


def get_range_test(session: Session, name: str, max_points: int = DEFAULT_TRACE_POINTS
                   ) -> RangeTestView:
    study = _study_by_name(session, name)
    trial = session.scalar(select(Trial).where(
        Trial.study_id == study.id, Trial.kind == "range_test"))
    if trial is None:
        raise NotFound(f"study {name!r} has no range test (submit it with lr_bounds \"auto\")")
    result = trial.result or {}
    lrs, losses = result.get("lrs", []), result.get("losses", [])
    keep = thin_indices(len(lrs), max_points)
    return RangeTestView(
        study_name=study.name, trial_number=trial.number, state=trial.state,
        error=trial.error, lrs=[lrs[i] for i in keep], losses=[losses[i] for i in keep],
        diverged=result.get("diverged", False), base_lr=result.get("base_lr"),
        max_lr=result.get("max_lr"), loss_minimum_lr=result.get("loss_minimum_lr"),
    )


def list_workers(session: Session) -> list[WorkerView]:
    workers = session.scalars(select(Worker).order_by(Worker.id)).all()
    return [WorkerView.model_validate(worker, from_attributes=True) for worker in workers]


def thin_indices(length: int, max_points: int) -> list[int]:
    """Evenly spaced indices into a sequence, first and last included, at most max_points."""
    if length <= max_points:
        return list(range(length))
    stride = (length - 1) / (max_points - 1)
    return sorted({round(i * stride) for i in range(max_points)})


# -- the worker protocol ------------------------------------------------------------------


def study_to_sample(session: Session) -> StudySpec | None:
    """The study whose next claim would ask Optuna for a new trial, as far as a read with
    no locks can tell; `claim` decides again under its locks. One statement: this runs
    before every claim."""
    for study in session.connection().execute(_RUNNING_STUDIES_TO_SAMPLE):
        if study.running >= study.parallelism:
            continue
        if study.queued:
            return None  # the claim takes a queued trial: nothing to sample
        spec = _spec_of(study.spec)
        if spec.lr_bounds == "auto" and not _range_test_done(session, study.id):
            return None
        if study.cyclic_trials < study.n_trials:
            return spec
    return None


_ANY_LAPSED = select(_TRIALS.c.id).where(
    _TRIALS.c.state == models.RUNNING, _TRIALS.c.lease_expires_at < bindparam("now")).limit(1)
# A claim's first question, in one statement: does this worker hold a trial already (it
# restarted under the same id), and has any lease lapsed?
_HELD_AND_ANY_LAPSED = select(
    select(_TRIALS.c.id)
    .where(_TRIALS.c.worker_id == bindparam("worker"), _TRIALS.c.state == models.RUNNING)
    .limit(1).scalar_subquery().label("held"),
    exists(_ANY_LAPSED).label("any_lapsed"),
)


def _trials_of_study_in(state: str) -> ColumnElement[bool]:
    return (_TRIALS.c.study_id == _STUDIES.c.id) & (_TRIALS.c.state == state)


# Running trials are counted through the index on state, so the cost does not grow
# with the study.
_RUNNING_STUDIES_TO_SAMPLE = (
    select(
        _STUDIES.c.id, _STUDIES.c.spec, _STUDIES.c.parallelism, _STUDIES.c.n_trials,
        _STUDIES.c.cyclic_trials,
        select(func.count()).select_from(_TRIALS).where(_trials_of_study_in(models.RUNNING))
        .scalar_subquery().label("running"),
        exists().where(_trials_of_study_in(models.QUEUED)).label("queued"),
    )
    .where(_STUDIES.c.state == models.STUDY_RUNNING)
    .order_by(_STUDIES.c.id)
)
_RUNNING_STUDIES_TO_CLAIM_FROM = (
    _RUNNING_STUDIES_TO_SAMPLE.add_columns(_STUDIES.c.name).with_for_update(of=_STUDIES)
)
_NEXT_TRIAL_NUMBER = select(func.coalesce(func.max(_TRIALS.c.number) + 1, 0)).where(
    _TRIALS.c.study_id == bindparam("study"))
_INSERT_TRIAL = insert(_TRIALS).returning(_TRIALS.c.id)
_COUNT_NEW_TRIAL = (
    update(_STUDIES).where(_STUDIES.c.id == bindparam("row_id"))
    .values(cyclic_trials=_STUDIES.c.cyclic_trials + 1)
)


def claim(
    session: Session, bridge: OptunaBridge, settings: ServerSettings,
    request: protocol.ClaimRequest, proposal: Proposal | None = None,
) -> protocol.ClaimResponse:
    """Give the worker a trial. `proposal`: settings sampled ahead for a study's next
    trial, used if that study asks Optuna now and nothing changed since."""
    bridge.lock_journal(session)
    now = db_now(session)
    held_id, any_lapsed = session.connection().execute(
        _HELD_AND_ANY_LAPSED, {"worker": request.worker_id, "now": now}).one()
    # A worker restarted under the same id is given back the trial it held.
    if held_id is not None:
        held = session.get_one(Trial, held_id)
        held.lease_expires_at = now + dt.timedelta(seconds=settings.lease_s)
        logger.info(
            "trial %d of study %r handed back to restarted worker %s",
            held.number, held.study.name, request.worker_id,
        )
        _touch_worker(session, request, now)
        return protocol.ClaimResponse(trial=_assignment(held, settings))

    if any_lapsed:
        _retry_lapsed(session, bridge, now)
    # The row locks make the count-then-ask below atomic across server processes.
    for row in session.connection().execute(_RUNNING_STUDIES_TO_CLAIM_FROM).all():
        if row.running >= row.parallelism:
            continue
        spec = _spec_of(row.spec)
        if not row.queued and row.cyclic_trials < row.n_trials and (
                spec.lr_bounds != "auto" or _range_test_done(session, row.id)):
            # The common case, a new trial from the sampler, in SQL Core.
            assignment = _claim_new_trial(session, bridge, settings, spec, row,
                                          request.worker_id, now, proposal)
            _touch_worker(session, request, now, holds=assignment.trial_id)
            return protocol.ClaimResponse(trial=assignment)
        trial = _claim_queued(session, settings, session.get_one(Study, row.id), spec,
                              request.worker_id, now)
        if trial is not None:
            _touch_worker(session, request, now, holds=trial.id)
            return protocol.ClaimResponse(trial=_assignment(trial, settings))
    _touch_worker(session, request, now)
    return protocol.ClaimResponse(retry_after_s=settings.claim_retry_s)


def _claim_new_trial(
    session: Session, bridge: OptunaBridge, settings: ServerSettings, spec: StudySpec,
    study: Row, worker_id: str, now: dt.datetime, proposal: Proposal | None,
) -> protocol.TrialAssignment:
    """A new trial from the sampler: ask Optuna, add the trial with the study's next
    number, leased to the worker, and count it against the study's budget."""
    connection = session.connection()
    optuna_trial_id, optuna_number, params = bridge.ask(spec, proposal)
    number = connection.execute(_NEXT_TRIAL_NUMBER, {"study": study.id}).scalar_one()
    lease_id = secrets.token_hex(16)
    trial_id = connection.execute(_INSERT_TRIAL, {
        "study_id": study.id, "number": number, "kind": "cyclic",
        "optuna_trial_id": optuna_trial_id, "optuna_number": optuna_number,
        "state": models.RUNNING, "params": params.model_dump(mode="json"), "attempts": 1,
        "infra_losses": 0, "worker_id": worker_id, "lease_id": lease_id,
        "lease_expires_at": now + dt.timedelta(seconds=settings.lease_s), "epochs_run": 0,
        "created_at": now, "started_at": now,
    }).scalar_one()
    connection.execute(_COUNT_NEW_TRIAL, {"row_id": study.id, "updated_at": now})
    logger.info("trial %d of study %r claimed by worker %s (attempt 1)",
                number, study.name, worker_id)
    return protocol.TrialAssignment(
        trial_id=trial_id, lease_id=lease_id, study_name=study.name, number=number,
        attempt=1, kind="cyclic", params=params, task=spec.task, objective=spec.objective,
        lease_s=settings.lease_s, heartbeat_s=settings.heartbeat_s,
    )


def _claim_queued(
    session: Session, settings: ServerSettings, study: Study, spec: StudySpec,
    worker_id: str, now: dt.datetime,
) -> Trial | None:
    """`claim` when the sampler does not give the trial: the study's queued trial (its
    range test first, while that has not set the space), or none; with none left and
    the budget spent, the study completes once its last trials end."""
    if spec.lr_bounds == "auto" and not _range_test_done(session, study.id):
        # Nothing else may start before the range test has set the space.
        trial = session.scalar(select(Trial).where(
            Trial.study_id == study.id, Trial.kind == "range_test",
            Trial.state == models.QUEUED))
    else:
        # Queued trials first, oldest number first: retries, then baselines.
        trial = session.scalar(
            select(Trial)
            .where(Trial.study_id == study.id, Trial.state == models.QUEUED)
            .order_by(Trial.number)
            .limit(1)
        )
        if trial is None:
            _complete_study_if_done(session, study, now)
    if trial is None:
        return None
    trial.state = models.RUNNING
    trial.attempts += 1
    trial.worker_id = worker_id
    trial.lease_id = secrets.token_hex(16)
    trial.lease_expires_at = now + dt.timedelta(seconds=settings.lease_s)
    trial.started_at = now
    study.updated_at = now
    session.flush()
    logger.info(
        "trial %d of study %r claimed by worker %s (attempt %d)",
        trial.number, study.name, worker_id, trial.attempts,
    )
    return trial


def heartbeat(
    session: Session, settings: ServerSettings, trial_id: int, body: protocol.HeartbeatRequest
) -> protocol.Decision:
    trial = _locked_trial(session, trial_id)
    _take_back_lapsed_lease(session, settings, trial, body.lease_id)
    if trial.state != models.RUNNING or trial.lease_id != body.lease_id:
        return protocol.Decision(action="stop", reason=_lost_reason(trial))
    now = db_now(session)
    trial.lease_expires_at = now + dt.timedelta(seconds=settings.lease_s)
    if trial.worker_id is not None:
        worker = session.get(Worker, trial.worker_id)
        if worker is not None:
            worker.last_seen_at = now
    if trial.study.state != models.STUDY_RUNNING:
        return protocol.Decision(action="stop", reason=f"study is {trial.study.state}")
    return protocol.Decision(action="continue")


def report(
    session: Session, bridge: OptunaBridge, settings: ServerSettings, trial_id: int,
    body: protocol.EpochReport,
) -> protocol.Decision:
    bridge.lock_journal(session)
    row = _trial_row(session, trial_id)
    if not _is_live(row, body.lease_id) or body.epoch <= row.epochs_run:
        # Repeats, lapsed leases taken back, lost leases, stopped studies.
        return _report_in_full(session, bridge, settings, trial_id, body)
    # The worker protocol's common case, in SQL Core: the ORM's loading and flushing
    # cost more than the statements themselves.
    spec = _spec_of(row.spec)
    value = body.val_loss if spec.objective == "val_loss" else body.val_accuracy
    action, reason = _decision(bridge, spec, row.kind, row.params, row.optuna_trial_id, body,
                               value)
    if action == "prune" and row.cyclic_trials >= row.n_trials:
        # The study may complete with this trial: the ORM path's bookkeeping.
        trial = _locked_trial(session, trial_id)
        return _record_report(session, bridge, settings, spec, trial, body, value, action,
                              reason)
    now = db_now(session)
    session.connection().execute(_INSERT_EPOCH, _epoch_row(row.id, body, action, now))
    if action == "prune":
        _finish_live(session, bridge, spec, row, models.PRUNED, value, now, body.epoch)
    else:
        _update_trial(session, row.id, epochs_run=body.epoch,
                      lease_expires_at=now + dt.timedelta(seconds=settings.lease_s))
    return protocol.Decision(action=action, reason=reason)


def _report_in_full(
    session: Session, bridge: OptunaBridge, settings: ServerSettings, trial_id: int,
    body: protocol.EpochReport,
) -> protocol.Decision:
    trial = _locked_trial(session, trial_id)
    # epochs_run is the highest epoch recorded: only an epoch at or below it can repeat.
    recorded = None if body.epoch > trial.epochs_run else session.scalar(
        select(TrialEpoch).where(TrialEpoch.trial_id == trial.id, TrialEpoch.epoch == body.epoch)
    )
    if recorded is not None:
        # A repeated report (after a timeout, a retry) gets the answer the first one got.
        return protocol.Decision(action=recorded.decision, reason="already recorded")
    _take_back_lapsed_lease(session, settings, trial, body.lease_id)
    _require_lease(trial, body.lease_id)

    study = trial.study
    spec = _spec(study)
    value = body.val_loss if spec.objective == "val_loss" else body.val_accuracy
    if study.state != models.STUDY_RUNNING:
        action, reason = "stop", f"study is {study.state}"
    else:
        action, reason = _decision(bridge, spec, trial.kind, trial.params,
                                   trial.optuna_trial_id, body, value)
    return _record_report(session, bridge, settings, spec, trial, body, value, action, reason)


def _decision(
    bridge: OptunaBridge, spec: StudySpec, kind: str, params: dict, optuna_trial_id: int | None,
    body: protocol.EpochReport, value: float,
) -> tuple[str, str]:
    """What a running trial of a running study does after this epoch; tells Optuna."""
    if kind != "cyclic":
        return "continue", ""  # baselines run to the end, unseen by the pruner
    if spec.cycle_aware_pruning and not _ends_cycle(params, body):
        # Mid-cycle values are kept in our table but never shown to the pruner.
        return "continue", ""
    if bridge.report(spec, optuna_trial_id, body.epoch, value,
                     # Pruning at the last epoch saves nothing and would turn a finished
                     # trial into a pruned one, out of the running for best.
                     ask_pruner=body.epoch < spec.task.epochs):
        return "prune", f"pruned at epoch {body.epoch} by the {_pruner_name(spec)}"
    return "continue", ""


def _record_report(
    session: Session, bridge: OptunaBridge, settings: ServerSettings, spec: StudySpec,
    trial: Trial, body: protocol.EpochReport, value: float, action: str, reason: str,
) -> protocol.Decision:
    now = db_now(session)
    session.add(TrialEpoch(**_epoch_row(trial.id, body, action, now)))
    trial.epochs_run = max(trial.epochs_run, body.epoch)
    trial.lease_expires_at = now + dt.timedelta(seconds=settings.lease_s)
    if action == "prune":
        trial.value = value
        _finish(session, bridge, spec, trial, models.PRUNED, now)
    elif action == "stop":
        _finish(session, bridge, spec, trial, models.STOPPED, now, error=reason)
    return protocol.Decision(action=action, reason=reason)


def _epoch_row(
    trial_id: int, body: protocol.EpochReport, decision: str, now: dt.datetime
) -> dict:
    return {
        "trial_id": trial_id, "epoch": body.epoch, "iterations": body.iterations,
        "train_loss": body.train_loss, "val_loss": body.val_loss,
        "val_accuracy": body.val_accuracy, "duration_s": body.duration_s, "lrs": body.lrs,
        "momentums": body.momentums, "decision": decision, "created_at": now,
    }


def complete(
    session: Session, bridge: OptunaBridge, settings: ServerSettings, trial_id: int,
    body: protocol.CompleteRequest,
) -> protocol.Ack:
    bridge.lock_journal(session)
    row = _trial_row(session, trial_id)
    if row is None:
        raise NotFound(f"no trial with id {trial_id}")
    if row.lease_id == body.lease_id and row.state in models.FINAL_TRIAL_STATES:
        return protocol.Ack(recorded=True, state=row.state)  # a repeat, or after a prune
    if (_is_live(row, body.lease_id) and row.kind != "range_test" and not body.stopped
            and row.cyclic_trials < row.n_trials):
        # The common case (see `report`): a search trial or a baseline whose study has
        # trials still to ask for, so that it cannot complete with this one.
        state = models.PRUNED if body.pruned else models.COMPLETE
        _finish_live(session, bridge, _spec_of(row.spec), row, state, body.value,
                     db_now(session))
        return protocol.Ack(recorded=True, state=state)
    trial = _locked_trial(session, trial_id)
    _take_back_lapsed_lease(session, settings, trial, body.lease_id)
    if trial.lease_id == body.lease_id and trial.state in models.FINAL_TRIAL_STATES:
        return protocol.Ack(recorded=True, state=trial.state)
    _require_lease(trial, body.lease_id)
    now = db_now(session)
    spec = _spec(trial.study)
    if trial.kind == "range_test" and not body.stopped:
        _complete_range_test(session, bridge, spec, trial, body, now)
    elif body.stopped:
        _finish(session, bridge, spec, trial, models.STOPPED, now, error="stopped")
    elif body.pruned:
        trial.value = body.value
        _finish(session, bridge, spec, trial, models.PRUNED, now)
    else:
        trial.value = body.value
        _finish(session, bridge, spec, trial, models.COMPLETE, now)
    return protocol.Ack(recorded=True, state=trial.state)


def fail(
    session: Session, bridge: OptunaBridge, settings: ServerSettings, trial_id: int,
    body: protocol.FailRequest,
) -> protocol.Ack:
    bridge.lock_journal(session)
    trial = _locked_trial(session, trial_id)
    if trial.lease_id == body.lease_id and trial.state in models.FINAL_TRIAL_STATES:
        return protocol.Ack(recorded=True, state=trial.state)
    if body.retryable and trial.lease_id == body.lease_id and trial.state == models.QUEUED:
        return protocol.Ack(recorded=True, state=trial.state)  # handed back already
    _take_back_lapsed_lease(session, settings, trial, body.lease_id)
    _require_lease(trial, body.lease_id)
    now = db_now(session)
    spec = _spec(trial.study)
    if body.retryable:
        _retry_or_fail(session, bridge, spec, trial, now, f"handed back: {body.error}")
    else:
        _finish(session, bridge, spec, trial, models.FAILED, now, error=body.error)
    return protocol.Ack(recorded=True, state=trial.state)


def sweep_lapsed_leases(session: Session, bridge: OptunaBridge, now: dt.datetime) -> int:
    """Retry or fail every running trial whose lease has lapsed; returns how many."""
    bridge.lock_journal(session)
    if session.connection().execute(_ANY_LAPSED, {"now": now}).first() is None:
        return 0  # the common case, in one light statement
    return _retry_lapsed(session, bridge, now)


def _retry_lapsed(session: Session, bridge: OptunaBridge, now: dt.datetime) -> int:
    query = select(Trial).where(
        Trial.state == models.RUNNING, Trial.lease_expires_at < now
    )
    if not is_sqlite(session.get_bind()):
        query = query.with_for_update(skip_locked=True)
    lapsed = session.scalars(query).all()
    for trial in lapsed:
        reason = f"lease of worker {trial.worker_id} lapsed"
        logger.warning(
            "trial %d of study %r: %s", trial.number, trial.study.name, reason
        )
        _retry_or_fail(session, bridge, _spec(trial.study), trial, now, reason)
    return len(lapsed)


# -- helpers ------------------------------------------------------------------------------


def _add_trial(
    session: Session, study: Study, kind: str, params: dict, now: dt.datetime
) -> Trial:
    """A queued trial with the study's next number (the caller holds the study's lock)."""
    session.flush()
    last = session.scalar(select(func.max(Trial.number)).where(Trial.study_id == study.id))
    trial = Trial(
        study_id=study.id, number=0 if last is None else last + 1, kind=kind,
        state=models.QUEUED, params=params, attempts=0, infra_losses=0, created_at=now,
    )
    session.add(trial)
    if kind == "cyclic":
        study.cyclic_trials += 1
    return trial


def _add_baselines(session: Session, study: Study, spec: StudySpec, now: dt.datetime) -> None:
    for baseline in spec.baseline_runs():
        _add_trial(session, study, "baseline", baseline.model_dump(mode="json"), now)


def _range_test_done(session: Session, study_id: int) -> bool:
    state = session.scalar(select(Trial.state).where(
        Trial.study_id == study_id, Trial.kind == "range_test"))
    return state == models.COMPLETE


def _complete_range_test(
    session: Session, bridge: OptunaBridge, spec: StudySpec, trial: Trial,
    body: protocol.CompleteRequest, now: dt.datetime,
) -> None:
    curve = body.range_test
    if curve is None or len(curve.lrs) != len(curve.losses):
        raise InvalidRequest(
            "a range-test trial completes with range_test: {lrs, losses} of equal length"
        )
    study = trial.study
    try:
        bounds = suggest_bounds(curve.lrs, curve.losses)
    except CurveTooFlat as error:
        trial.result = {"lrs": curve.lrs, "losses": curve.losses, "diverged": curve.diverged}
        _finish(session, bridge, spec, trial, models.FAILED, now, error=str(error))
        return
    space = space_around(spec.space, bounds)
    trial.result = {
        "lrs": curve.lrs, "losses": curve.losses, "diverged": curve.diverged,
        "base_lr": bounds.base_lr, "max_lr": bounds.max_lr,
        "loss_minimum_lr": bounds.loss_minimum_lr,
    }
    trial.value = bounds.max_lr
    updated = spec.model_copy(update={"space": space})
    study.spec = updated.model_dump(mode="json")
    _add_baselines(session, study, updated, now)
    logger.info(
        "range test of study %r suggests base_lr %.3g and max_lr %.3g; max_lr now searched "
        "in [%.3g, %.3g]", study.name, bounds.base_lr, bounds.max_lr,
        space.max_lr.low, space.max_lr.high,  # type: ignore[union-attr]
    )
    _finish(session, bridge, updated, trial, models.COMPLETE, now)


def _ends_cycle(params: dict, body: protocol.EpochReport) -> bool:
    batches_per_epoch = max(1, body.iterations // body.epoch)
    length = cycle_length(CyclicParams(**params), batches_per_epoch)
    return is_cycle_end(body.iterations - batches_per_epoch, body.iterations, length)


def _retry_or_fail(
    session: Session, bridge: OptunaBridge, spec: StudySpec, trial: Trial,
    now: dt.datetime, reason: str,
) -> None:
    study = trial.study
    if study.state != models.STUDY_RUNNING:
        _finish(session, bridge, spec, trial, models.STOPPED, now, error=reason)
        return
    trial.infra_losses += 1
    if trial.infra_losses <= spec.max_retries:
        # Same Optuna trial, same parameters: the sampler sees one trial, not two.
        # worker_id and lease_id stay: the last holder may yet deliver what it ran.
        trial.state = models.QUEUED
        trial.lease_expires_at = None
        trial.error = reason
        _release_worker(session, trial)
        logger.info(
            "trial %d of study %r queued again after attempt %d: %s",
            trial.number, study.name, trial.attempts, reason,
        )
    else:
        _finish(
            session, bridge, spec, trial, models.FAILED, now,
            error=f"{reason}; gave up after {trial.infra_losses} infrastructure losses "
                  f"(max_retries={spec.max_retries})",
        )


def _finish(
    session: Session, bridge: OptunaBridge, spec: StudySpec, trial: Trial, state: str,
    now: dt.datetime, error: str | None = None,
) -> None:
    if trial.optuna_number is not None:
        bridge.tell(spec, trial.optuna_number, state, trial.value)
    trial.state = state
    trial.finished_at = now
    trial.lease_expires_at = None
    if error is not None:
        trial.error = error
    _release_worker(session, trial)
    level = logging.WARNING if state == models.FAILED else logging.INFO
    logger.log(
        level, "trial %d of study %r %s (value %s)%s",
        trial.number, trial.study.name, state, trial.value,
        f": {error}" if error and state == models.FAILED else "",
    )
    if trial.kind == "range_test" and state in (models.FAILED, models.STOPPED):
        if trial.study.state == models.STUDY_RUNNING:
            _stop(session, bridge, trial.study, now, f"the LR range test {state}: {error}")
    elif state == models.FAILED:
        _stop_if_failing(session, bridge, spec, trial.study, now, error or "")
    _complete_study_if_done(session, trial.study, now)


def _stop_if_failing(
    session: Session, bridge: OptunaBridge, spec: StudySpec, study: Study, now: dt.datetime,
    last_error: str,
) -> None:
    session.flush()
    failed = _counts_by_study(session, [study.id]).get(study.id, TrialCounts()).failed
    if failed > spec.max_failed_trials and study.state == models.STUDY_RUNNING:
        last_line = last_error.strip().splitlines()[-1] if last_error.strip() else "unknown"
        _stop(session, bridge, study, now,
              f"{failed} trials failed, more than max_failed_trials={spec.max_failed_trials}; "
              f"last error: {last_line}")


def _complete_study_if_done(session: Session, study: Study, now: dt.datetime) -> None:
    session.flush()
    if study.state != models.STUDY_RUNNING:
        return
    # The caller holds Optuna's journal, as every claim does until its new trial is
    # committed, so the counts below cannot miss a trial that a concurrent claim is
    # adding (each count is its own snapshot under READ COMMITTED).
    if study.cyclic_trials < study.n_trials:
        return  # trials are still to be asked for: the cheap test, first
    counts = _counts_by_study(session, [study.id]).get(study.id, TrialCounts())
    finished = counts.complete + counts.pruned + counts.failed + counts.stopped
    if counts.running == 0 and counts.queued == 0:
        study.state = models.STUDY_COMPLETE
        study.updated_at = now
        logger.info("study %r complete: %d trials finished", study.name, finished)


def _release_worker(session: Session, trial: Trial) -> None:
    if trial.worker_id is not None:
        _release_worker_of(session, trial.worker_id, trial.id)


def _release_worker_of(session: Session, worker_id: str, trial_id: int) -> None:
    # On the connection, past the ORM: a Worker loaded in this session may keep the old
    # trial_id, and nothing reads it.
    session.connection().execute(_RELEASE_WORKER, {"worker": worker_id, "held": trial_id})


def _take_back_lapsed_lease(
    session: Session, settings: ServerSettings, trial: Trial, lease_id: str
) -> None:
    """A worker that was cut off past its lease may still hold the trial's last lease:
    while no other worker has claimed the trial, its results are taken, not redone."""
    if trial.state != models.QUEUED or trial.lease_id != lease_id:
        return
    now = db_now(session)
    trial.state = models.RUNNING
    trial.lease_expires_at = now + dt.timedelta(seconds=settings.lease_s)
    logger.info("trial %d of study %r: the holder of its lapsed lease is back; taken back",
                trial.number, trial.study.name)


def _require_lease(trial: Trial, lease_id: str) -> None:
    if trial.state != models.RUNNING or trial.lease_id != lease_id:
        raise LeaseLost(
            f"trial {trial.number} of study {trial.study.name!r} is not leased to this "
            f"worker any more ({_lost_reason(trial)}); drop it and claim another"
        )


def _lost_reason(trial: Trial) -> str:
    if trial.state != models.RUNNING:
        return f"the trial is {trial.state}"
    return "the lease lapsed and the trial went to another worker"


# The fast paths of `report` and `complete`, as SQL Core statements built once (building
# and keying a statement per call costs more than running it) and run on the session's
# connection, past the ORM.
_SELECT_TRIAL_AND_STUDY = (
    select(
        _TRIALS.c.id, _TRIALS.c.number, _TRIALS.c.kind, _TRIALS.c.state, _TRIALS.c.lease_id,
        _TRIALS.c.epochs_run, _TRIALS.c.params, _TRIALS.c.optuna_trial_id,
        _TRIALS.c.optuna_number, _TRIALS.c.worker_id,
        _STUDIES.c.name.label("study_name"), _STUDIES.c.state.label("study_state"),
        _STUDIES.c.spec, _STUDIES.c.n_trials, _STUDIES.c.cyclic_trials,
    )
    .select_from(_TRIALS.join(_STUDIES, _STUDIES.c.id == _TRIALS.c.study_id))
    .where(_TRIALS.c.id == bindparam("trial_id"))
    .with_for_update(of=_TRIALS)
)
_INSERT_EPOCH = insert(TrialEpoch.__table__)
# The SET clause comes from the parameters given, other than `row_id`.
_UPDATE_TRIAL = update(_TRIALS).where(_TRIALS.c.id == bindparam("row_id"))
_RELEASE_WORKER = (
    update(Worker.__table__)
    .where(Worker.__table__.c.id == bindparam("worker"),
           Worker.__table__.c.trial_id == bindparam("held"))
    .values(trial_id=None)
)


def _trial_row(session: Session, trial_id: int) -> Row | None:
    """The trial with its study's columns, row-locked (the fast paths' one read)."""
    return session.connection().execute(
        _SELECT_TRIAL_AND_STUDY, {"trial_id": trial_id}).one_or_none()


def _is_live(row: Row | None, lease_id: str) -> bool:
    """Leased to the caller and running in a running study: the fast paths' case."""
    return row is not None and row.state == models.RUNNING and row.lease_id == lease_id and (
        row.study_state == models.STUDY_RUNNING)


def _update_trial(session: Session, trial_id: int, **values: object) -> None:
    session.connection().execute(_UPDATE_TRIAL, {"row_id": trial_id, **values})


def _finish_live(
    session: Session, bridge: OptunaBridge, spec: StudySpec, row: Row, state: str,
    value: float | None, now: dt.datetime, epochs_run: int | None = None,
) -> None:
    """`_finish` for the common case: a search trial or baseline ends complete or pruned
    while its study still has trials to ask for (so the study cannot complete with it,
    and no failure or range test is involved)."""
    if row.optuna_number is not None:
        bridge.tell(spec, row.optuna_number, state, value)
    values: dict[str, object] = {"state": state, "value": value, "finished_at": now,
                                 "lease_expires_at": None}
    if epochs_run is not None:
        values["epochs_run"] = epochs_run
    _update_trial(session, row.id, **values)
    if row.worker_id is not None:
        _release_worker_of(session, row.worker_id, row.id)
    logger.info("trial %d of study %r %s (value %s)", row.number, row.study_name, state, value)


def _locked_trial(session: Session, trial_id: int) -> Trial:
    # The study comes in the same statement: every caller needs it. Only the trial's row
    # is locked; the journal's lock already keeps other writers of the study out.
    trial = session.scalar(
        select(Trial).options(joinedload(Trial.study)).where(Trial.id == trial_id)
        .with_for_update(of=Trial)
    )
    if trial is None:
        raise NotFound(f"no trial with id {trial_id}")
    return trial


def _touch_worker(
    session: Session, request: protocol.ClaimRequest, now: dt.datetime,
    holds: int | None = None,
) -> None:
    """Record the worker's claim in one statement: added the first time it is seen, else
    refreshed; `holds`: the trial it was just given."""
    connection = session.connection()
    first_seen = connection.execute(
        _upsert_worker(connection.dialect.name, holds is not None),
        {"id": request.worker_id, "host": request.host, "device": request.device,
         "first_seen_at": now, "last_seen_at": now, "trial_id": holds},
    ).scalar_one()
    if first_seen == now:
        logger.info("worker %s on %s (%s) seen for the first time",
                    request.worker_id, request.host, request.device)


@functools.cache
def _upsert_worker(dialect: str, with_trial: bool) -> ReturningInsert:
    table = Worker.__table__
    statement = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    refreshed = {"host": statement.excluded.host, "device": statement.excluded.device,
                 "last_seen_at": statement.excluded.last_seen_at}
    if with_trial:
        refreshed["trial_id"] = statement.excluded.trial_id
    return statement.on_conflict_do_update(
        index_elements=[table.c.id], set_=refreshed).returning(table.c.first_seen_at)


def _assignment(trial: Trial, settings: ServerSettings) -> protocol.TrialAssignment:
    spec = _spec(trial.study)
    return protocol.TrialAssignment(
        trial_id=trial.id, lease_id=trial.lease_id or "", study_name=trial.study.name,
        number=trial.number, attempt=trial.attempts, kind=trial.kind,
        params=CyclicParams(**trial.params) if trial.kind == "cyclic" else None,
        baseline=BaselineParams(**trial.params) if trial.kind == "baseline" else None,
        range_test=RangeTestSpec(**trial.params) if trial.kind == "range_test" else None,
        task=spec.task, objective=spec.objective, lease_s=settings.lease_s,
        heartbeat_s=settings.heartbeat_s,
    )


def _study_by_name(session: Session, name: str, lock: bool = False) -> Study:
    query = select(Study).where(Study.name == name)
    if lock:
        query = query.with_for_update()
    study = session.scalar(query)
    if study is None:
        raise NotFound(f"no study named {name!r}; `clrsearch status` lists the studies")
    return study


def _spec(study: Study) -> StudySpec:
    return _spec_of(study.spec)


def _spec_of(stored: dict) -> StudySpec:
    return StudySpec.model_validate(stored)


def _pruner_name(spec: StudySpec) -> str:
    pruner = spec.pruner
    return f"{pruner if isinstance(pruner, str) else pruner.name} pruner"


def _counts_by_study(
    session: Session, study_ids: Sequence[int], kinds: Sequence[str] | None = None
) -> dict[int, TrialCounts]:
    """Trials per state for each study, of the given kinds (all kinds when None)."""
    if not study_ids:
        return {}
    query = (
        select(Trial.study_id, Trial.state, func.count())
        .where(Trial.study_id.in_(study_ids))
        .group_by(Trial.study_id, Trial.state)
    )
    if kinds is not None:
        query = query.where(Trial.kind.in_(kinds))
    rows = session.execute(query).all()
    tallies: dict[int, Counter[str]] = {}
    for study_id, state, count in rows:
        tallies.setdefault(study_id, Counter())[state] = count
    return {study_id: TrialCounts(**tally) for study_id, tally in tallies.items()}


def _best_trial_row(session: Session, study: Study) -> Trial | None:
    order = Trial.value.asc() if study.direction == "minimize" else Trial.value.desc()
    return session.scalar(
        select(Trial)
        .where(Trial.study_id == study.id, Trial.state == models.COMPLETE,
               Trial.kind == "cyclic")
        .order_by(order, Trial.number)
        .limit(1)
    )


def _best_values(session: Session, studies: Sequence[Study]) -> dict[int, float]:
    best: dict[int, float] = {}
    for direction, aggregate in (("minimize", func.min), ("maximize", func.max)):
        ids = [study.id for study in studies if study.direction == direction]
        if not ids:
            continue
        rows = session.execute(
            select(Trial.study_id, aggregate(Trial.value))
            .where(Trial.study_id.in_(ids), Trial.state == models.COMPLETE,
                   Trial.kind == "cyclic")
            .group_by(Trial.study_id)
        ).all()
        best.update({study_id: value for study_id, value in rows if value is not None})
    return best


def _study_summary(
    study: Study, counts: TrialCounts, other_counts: TrialCounts, best: float | None
) -> StudySummary:
    spec = study.spec
    pruner = spec["pruner"]
    return StudySummary(
        id=study.id, name=study.name, state=study.state, stop_reason=study.stop_reason,
        objective=spec["objective"], direction=study.direction, sampler=spec["sampler"],
        pruner=pruner if isinstance(pruner, str) else pruner["name"],
        n_trials=study.n_trials, parallelism=study.parallelism, counts=counts,
        other_counts=other_counts,
        best_value=best, created_at=study.created_at, updated_at=study.updated_at,
    )


def _study_detail(session: Session, study: Study) -> StudyDetail:
    session.flush()
    counts = _counts_by_study(session, [study.id], SEARCH_KINDS).get(study.id, TrialCounts())
    others = _counts_by_study(session, [study.id], OTHER_KINDS).get(study.id, TrialCounts())
    best = _best_trial_row(session, study)
    summary = _study_summary(study, counts, others, best.value if best else None)
    return StudyDetail(
        **summary.model_dump(), spec=study.spec,
        best_trial=_trial_summary(best) if best else None,
        baseline_comparison=_baseline_comparison(session, study, best) if best else None,
    )


def _baseline_comparison(
    session: Session, study: Study, best: Trial
) -> BaselineComparison | None:
    baselines = session.scalars(select(Trial).where(
        Trial.study_id == study.id, Trial.kind == "baseline", Trial.state == models.COMPLETE,
        Trial.value.is_not(None))).all()
    if not baselines or best.value is None:
        return None
    minimize = study.direction == "minimize"
    reference = (min if minimize else max)(baselines, key=lambda trial: trial.value)
    target = reference.value
    assert target is not None

    def reaches(value: float) -> bool:
        return value <= target if minimize else value >= target

    objective = study.spec["objective"]
    reached = next(
        (epoch.iterations for epoch in best.epochs if reaches(getattr(epoch, objective))), None
    )
    baseline_iterations = reference.epochs[-1].iterations if reference.epochs else 0
    return BaselineComparison(
        baseline_number=reference.number, baseline_schedule=reference.params["schedule"],
        baseline_value=target, baseline_iterations=baseline_iterations,
        cyclic_number=best.number, cyclic_value=best.value,
        cyclic_iterations_to_reach=reached,
        iteration_ratio=(reached / baseline_iterations
                         if reached is not None and baseline_iterations else None),
    )


def _trial_summary(trial: Trial) -> TrialSummary:
    return TrialSummary.model_validate(trial, from_attributes=True)
