"""The worker's claim-train-report loop.

    deliver the spool ──▶ claim ──▶ train (heartbeats in a thread) ──▶ report each epoch
          ▲                                                                    │
          └──────────────────────────── complete / fail ◀─────────────────────┘

Results (epoch reports, the completion, a failure) go through the spool
(`worker.spool`): written to disk, then delivered in order. An epoch's report is sent by
the outbox's sender thread while the next epoch trains; the answer is applied when it
comes: a "prune" or "stop" ends training at its next check (every few dozen optimizer
steps) or epoch end, and the epochs trained past the answered one are dropped unreported.
The completion waits for the last report's answer, so that a prune on it counts. While
the server cannot be reached the worker trains on, with no pruning answers, and the
results wait; before each claim, and at start-up, everything waiting is delivered first,
so that the server hears a trial's end before it is asked for the next one, and nothing
a dead process left behind is lost.

With a checkpoint folder, every epoch of a trial is saved (`worker.checkpoint`) and a
retried trial resumes where the lost attempt was. The checkpoint is deleted once the
server has recorded the trial's completion or final failure, not before: a worker that
dies after training but before delivering leaves the retry a finished checkpoint.

The first SIGINT or SIGTERM asks the worker to leave: the current trial stops at the
next batch boundary and is handed back to the server (`fail` with `retryable`), so that
another worker runs it again with the same parameters; then the worker exits. A second
signal exits at once.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable

import torch

from clrsearch import protocol
from worker.checkpoint import CheckpointStore
from worker.client import ServerUnreachable, WorkerClient
from worker.data import DatasetCache, DatasetUnavailable
from worker.range_test import run_range_test
from worker.settings import WorkerSettings
from worker.spool import Delivery, Entry, Outbox, Posted, Spool
from worker.training import Ending, EpochResult, PrecisionUnavailable, train_trial

logger = logging.getLogger(__name__)

# The pauses between claims while the server does not answer.
FIRST_CLAIM_DELAY_S = 0.5
MAX_CLAIM_DELAY_S = 5.0


def pick_device(requested: str) -> torch.device:
    """CUDA when present and asked for ('auto'), else CPU; 'cuda:1' pins a device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was asked for, but CUDA is not available here")
    return device


class Worker:
    def __init__(self, settings: WorkerSettings, client: WorkerClient | None = None) -> None:
        self.settings = settings
        token = settings.worker_token.get_secret_value() if settings.worker_token else None
        self.client = client or WorkerClient(
            settings.server_url, token, settings.request_timeout_s, settings.server_patience_s
        )
        self.device = pick_device(settings.device)
        self.datasets = DatasetCache(settings.data_dir)
        self.spool = Spool(settings.spool_folder / settings.worker_id)
        self.outbox = Outbox(self.spool, self.client, on_recorded=self._trial_recorded)
        self.shutdown = threading.Event()
        self.trials_run = 0
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)

    def install_signal_handlers(self) -> None:
        def leave(signum: int, _frame: object) -> None:
            if self.shutdown.is_set():
                raise KeyboardInterrupt
            logger.warning("worker %s got signal %d: leaving, and handing back the trial "
                           "it runs, if any", self.settings.worker_id, signum)
            self.shutdown.set()

        signal.signal(signal.SIGINT, leave)
        signal.signal(signal.SIGTERM, leave)

    def run(self) -> int:
        """Claim and run trials until told to leave or idle too long; returns trials run."""
        request = protocol.ClaimRequest(
            worker_id=self.settings.worker_id, host=socket.gethostname(),
            device=_describe(self.device),
        )
        logger.info("worker %s on %s polling %s", self.settings.worker_id, request.device,
                    self.settings.server_url)
        try:
            adopted = self.spool.adopt_orphans()
            if adopted:
                logger.info("worker %s took in %d results left by stopped workers",
                            self.settings.worker_id, adopted)
            self._deliver_spool()
            self._claim_and_train(request)
        finally:
            self._close()
        return self.trials_run

    def _claim_and_train(self, request: protocol.ClaimRequest) -> None:
        idle_since = time.monotonic()
        delay_s = FIRST_CLAIM_DELAY_S
        # The answer to the claim that went with the last completion, if it went.
        answered: protocol.ClaimResponse | None = None
        while not self.shutdown.is_set():
            try:
                answer = (answered if answered is not None
                          else self.client.claim(request, patience_s=0))
            except ServerUnreachable as error:
                # One warning per outage, then quiet retries. Time without a server is not
                # idleness: there may be work once it is back.
                level = logging.WARNING if delay_s == FIRST_CLAIM_DELAY_S else logging.DEBUG
                logger.log(level, "worker %s cannot claim: %s; trying again until the "
                           "server answers", self.settings.worker_id, error)
                self.shutdown.wait(delay_s)
                delay_s = min(delay_s * 2, MAX_CLAIM_DELAY_S)
                idle_since = time.monotonic()
                continue
            if delay_s != FIRST_CLAIM_DELAY_S:
                logger.info("worker %s reaches the server again", self.settings.worker_id)
            delay_s = FIRST_CLAIM_DELAY_S
            answered = None
            if answer.trial is None:
                idle_s = time.monotonic() - idle_since
                if self.settings.max_idle_s is not None and idle_s >= self.settings.max_idle_s:
                    logger.info("worker %s: no work for %.0f s, leaving",
                                self.settings.worker_id, idle_s)
                    return
                self.shutdown.wait(answer.retry_after_s or 1.0)
                continue
            answered = self.run_trial(answer.trial, claim_next=request)
            # The server hears how this trial ended before it is asked for another: a
            # claim first would be answered with this very trial, still running there.
            # (A claim that went with the completion was answered after it was recorded.)
            self._deliver_spool()
            idle_since = time.monotonic()
        if answered is not None and answered.trial is not None:
            # Claimed with the last completion while the signal to leave came: handed
            # back at once rather than held until its lease lapses.
            self._send_fail(answered.trial, "the worker left before starting the trial",
                            retryable=True)

    def run_trial(
        self, trial: protocol.TrialAssignment, claim_next: protocol.ClaimRequest | None = None
    ) -> protocol.ClaimResponse | None:
        """Train one trial and send its results. With `claim_next`, the completion carries
        that claim, unless the worker is leaving; returns the server's answer to it, or
        None when it was not sent or not answered (the caller then claims on its own)."""
        label = f"trial {trial.number} of study {trial.study_name!r}"
        settings = trial.params or trial.baseline or trial.range_test
        logger.info("worker %s starts %s %s (attempt %d): %s", self.settings.worker_id,
                    trial.kind, label, trial.attempt,
                    settings.model_dump(exclude_none=True) if settings else {})
        told_to_stop = threading.Event()
        lease_lost = threading.Event()
        finished = threading.Event()
        threading.Thread(
            target=self._heartbeat, args=(trial, finished, told_to_stop), daemon=True
        ).start()

        reports: list[Posted] = []
        worker_id = self.settings.worker_id

        def on_epoch(result: EpochResult) -> None:
            # Spooled here, sent by the outbox's sender thread: training goes on at once
            # and hears the answer through `ending` (prune, stop) or `should_stop` (the
            # lease was lost).
            reports.append(self.outbox.post(
                "report", trial, _epoch_report(trial, result),
                on_delivery=lambda delivery: answered(result, delivery),
            ))

        def answered(result: EpochResult, delivery: Delivery) -> None:
            # Runs on the delivering thread, as soon as the report has been tried.
            if delivery.lease_lost:
                lease_lost.set()
            elif isinstance(delivery.answer, protocol.Decision):
                logger.info("%s epoch %d on worker %s: val_loss %.4f, val_accuracy %.4f -> "
                            "%s", label, result.epoch, worker_id, result.val_loss,
                            result.val_accuracy, delivery.answer.action)
            elif delivery.ended is None:
                logger.info("%s epoch %d on worker %s: val_loss %.4f, val_accuracy %.4f, "
                            "spooled (%d waiting); training goes on", label, result.epoch,
                            worker_id, result.val_loss, result.val_accuracy,
                            delivery.waiting)

        def ending(wait: bool) -> Ending | None:
            if wait:
                # Each report settles once one pass has tried it, answered or not, so
                # this waits for the server's answers but not for an absent server.
                for posted in reports:
                    posted.wait()
            ended = self.outbox.ended(trial.lease_id)
            if ended is None:
                return None
            answer, epoch = ended
            logger.info("%s on worker %s: the server answered %s to epoch %d's report; "
                        "training ends there", label, worker_id, answer, epoch)
            return Ending("prune" if answer == "prune" else "stop", epoch)

        def should_stop() -> bool:
            return self.shutdown.is_set() or told_to_stop.is_set() or lease_lost.is_set()

        if trial.kind == "range_test":
            try:
                self._run_range_test(trial, label, should_stop)
            finally:
                finished.set()
            return None

        checkpoint = None
        if self.settings.checkpoint_dir is not None:
            checkpoint = CheckpointStore(self.settings.checkpoint_dir, trial.study_name,
                                         trial.number)
        try:
            data = self.datasets.get(trial.task)
            schedule = trial.params if trial.kind == "cyclic" else trial.baseline
            if schedule is None:
                raise ValueError(f"the server sent a {trial.kind} trial without its settings")
            outcome = train_trial(schedule, trial.task, trial.objective, data,
                                  self.device, on_epoch, should_stop, checkpoint, ending)
        except Exception as error:
            finished.set()
            if lease_lost.is_set():
                return None
            # Missing data or a precision this device lacks may be present on another
            # worker; a training error is not.
            retryable = isinstance(error, (DatasetUnavailable, PrecisionUnavailable))
            logger.error("%s failed on worker %s: %s", label, self.settings.worker_id, error)
            self._send_fail(trial, traceback.format_exc(), retryable=retryable)
            return None
        finished.set()
        self.trials_run += 1

        if lease_lost.is_set():
            logger.warning("%s: the lease went to another worker; its results are theirs",
                           label)
            return None
        if outcome.status == "stopped" and self.shutdown.is_set() and not told_to_stop.is_set():
            self._send_fail(trial, "the worker was shut down mid-trial", retryable=True)
            return None
        body = protocol.CompleteRequest(
            lease_id=trial.lease_id, value=outcome.value if outcome.value is not None else 0.0,
            pruned=outcome.status == "pruned", stopped=outcome.status == "stopped",
        )
        delivery = self.outbox.send(
            "complete", trial, body,
            claim_next=None if self.shutdown.is_set() else claim_next,
        )
        if isinstance(delivery.answer, protocol.Ack):
            logger.info("%s %s with value %s", label, delivery.answer.state, outcome.value)
            return delivery.answer.next
        if not delivery.lease_lost:
            logger.info("%s %s with value %s; the completion is spooled until the server "
                        "answers", label, outcome.status, outcome.value)
        return None

    def _run_range_test(self, trial: protocol.TrialAssignment, label: str,
                        should_stop: Callable[[], bool]) -> None:
        assert trial.range_test is not None  # the server sends it with every range test
        try:
            data = self.datasets.get(trial.task)
            curve = run_range_test(trial.range_test, trial.task, data, self.device, should_stop)
        except Exception as error:
            retryable = isinstance(error, DatasetUnavailable)
            logger.error("%s failed on worker %s: %s", label, self.settings.worker_id, error)
            self._send_fail(trial, traceback.format_exc(), retryable=retryable)
            return
        if should_stop():
            if self.shutdown.is_set():
                self._send_fail(trial, "the worker was shut down mid-test", retryable=True)
            return
        self.trials_run += 1
        if len(curve.lrs) < 2:
            self._send_fail(trial, f"the range test diverged after {len(curve.lrs)} step(s); "
                            "lower range_test.start_lr", retryable=False)
            return
        body = protocol.CompleteRequest(
            lease_id=trial.lease_id, value=0.0,
            range_test=protocol.RangeTestCurve(lrs=curve.lrs, losses=curve.losses,
                                               diverged=curve.diverged),
        )
        delivery = self.outbox.send("complete", trial, body)
        logger.info("%s: range test of %d steps sent (%s)", label, len(curve.lrs),
                    delivery.answer.state if isinstance(delivery.answer, protocol.Ack)
                    else "spooled")

    def _send_fail(self, trial: protocol.TrialAssignment, error: str, retryable: bool) -> None:
        body = protocol.FailRequest(lease_id=trial.lease_id, error=error[-20000:],
                                    retryable=retryable)
        delivery = self.outbox.send("fail", trial, body)
        if delivery.answer is None and not delivery.lease_lost:
            logger.info("trial %d of study %r: the failure report is spooled until the "
                        "server answers", trial.number, trial.study_name)

    def _trial_recorded(self, entry: Entry, ack: protocol.Ack) -> None:
        """The server has a trial's last word: its checkpoint has served its purpose."""
        final = entry.call == "complete" or not entry.body.get("retryable", False)
        if final and self.settings.checkpoint_dir is not None:
            CheckpointStore(self.settings.checkpoint_dir, entry.study_name, entry.number).delete()

    def _deliver_spool(self) -> None:
        waiting = len(self.spool)
        if waiting:
            logger.info("worker %s delivers %d spooled results before claiming",
                        self.settings.worker_id, waiting)
            self.outbox.drain(self.shutdown)

    def _close(self) -> None:
        try:
            self.outbox.close(timeout_s=self.settings.request_timeout_s)
            if len(self.spool):
                self.outbox.deliver()
            waiting = len(self.spool)
            if waiting:
                logger.warning("worker %s leaves %d undelivered results in %s; the next "
                               "worker started with that spool folder delivers them",
                               self.settings.worker_id, waiting, self.spool.folder)
        finally:
            self.spool.close()
            self.client.close()

    def _heartbeat(self, trial: protocol.TrialAssignment, finished: threading.Event,
                   told_to_stop: threading.Event) -> None:
        failing = False
        while not finished.wait(trial.heartbeat_s):
            try:
                # Tried once: the next beat is the retry, and the lease has slack for it.
                decision = self.client.heartbeat(trial.trial_id, trial.lease_id, patience_s=0)
            except Exception as error:
                # One warning per outage, not one per beat.
                level = logging.DEBUG if failing else logging.WARNING
                logger.log(level, "heartbeat for trial %d of study %r failed: %s",
                           trial.number, trial.study_name, error)
                failing = True
                continue
            failing = False
            if decision.action == "stop":
                logger.info("trial %d of study %r told to stop: %s", trial.number,
                            trial.study_name, decision.reason)
                told_to_stop.set()
                return


def _epoch_report(trial: protocol.TrialAssignment, result: EpochResult) -> protocol.EpochReport:
    return protocol.EpochReport(
        lease_id=trial.lease_id, epoch=result.epoch, iterations=result.iterations,
        train_loss=result.train_loss, val_loss=result.val_loss,
        val_accuracy=result.val_accuracy, duration_s=result.duration_s,
        lrs=result.lrs, momentums=result.momentums,
    )


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
