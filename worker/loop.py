"""The worker's claim-train-report loop.

    claim ──▶ train (heartbeats in a thread) ──▶ report each epoch ──▶ complete / fail
      ▲                                                                       │
      └───────────────────────────────────────────────────────────────────────┘

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

import torch

from clrsearch import protocol
from worker.client import LeaseLost, ServerError, WorkerClient
from worker.data import DatasetCache, DatasetUnavailable
from worker.settings import WorkerSettings
from worker.training import EpochResult, train_trial

logger = logging.getLogger(__name__)


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
        self.shutdown = threading.Event()
        self.trials_run = 0
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)

    def install_signal_handlers(self) -> None:
        def leave(signum: int, _frame: object) -> None:
            if self.shutdown.is_set():
                raise KeyboardInterrupt
            logger.warning("worker %s got signal %d: handing back the current trial and "
                           "leaving", self.settings.worker_id, signum)
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
        idle_since = time.monotonic()
        try:
            while not self.shutdown.is_set():
                answer = self.client.claim(request)
                if answer.trial is None:
                    idle_s = time.monotonic() - idle_since
                    if self.settings.max_idle_s is not None and idle_s >= self.settings.max_idle_s:
                        logger.info("worker %s: no work for %.0f s, leaving",
                                    self.settings.worker_id, idle_s)
                        break
                    self.shutdown.wait(answer.retry_after_s or 1.0)
                    continue
                self.run_trial(answer.trial)
                idle_since = time.monotonic()
        finally:
            self.client.close()
        return self.trials_run

    def run_trial(self, trial: protocol.TrialAssignment) -> None:
        label = f"trial {trial.number} of study {trial.study_name!r}"
        logger.info("worker %s starts %s (attempt %d): %s", self.settings.worker_id, label,
                    trial.attempt, trial.params.model_dump(exclude_none=True))
        told_to_stop = threading.Event()
        lease_lost = threading.Event()
        finished = threading.Event()
        threading.Thread(
            target=self._heartbeat, args=(trial, finished, told_to_stop), daemon=True
        ).start()

        def on_epoch(result: EpochResult) -> str:
            try:
                decision = self.client.report(trial.trial_id, _epoch_report(trial, result))
            except LeaseLost as error:
                logger.warning("%s: %s", label, error)
                lease_lost.set()
                return "stop"
            logger.info("%s epoch %d: val_loss %.4f, val_accuracy %.4f -> %s", label,
                        result.epoch, result.val_loss, result.val_accuracy, decision.action)
            return decision.action

        def should_stop() -> bool:
            return self.shutdown.is_set() or told_to_stop.is_set() or lease_lost.is_set()

        try:
            data = self.datasets.get(trial.task)
            outcome = train_trial(trial.params, trial.task, trial.objective, data,
                                  self.device, on_epoch, should_stop)
        except Exception as error:
            finished.set()
            if lease_lost.is_set():
                return
            # Missing data may be present on another worker; a training error is not.
            retryable = isinstance(error, DatasetUnavailable)
            logger.error("%s failed on worker %s: %s", label, self.settings.worker_id, error)
            self._send_fail(trial, traceback.format_exc(), retryable=retryable)
            return
        finished.set()
        self.trials_run += 1

        if lease_lost.is_set():
            return
        if outcome.status == "stopped" and self.shutdown.is_set() and not told_to_stop.is_set():
            self._send_fail(trial, "the worker was shut down mid-trial", retryable=True)
            return
        body = protocol.CompleteRequest(
            lease_id=trial.lease_id, value=outcome.value if outcome.value is not None else 0.0,
            pruned=outcome.status == "pruned", stopped=outcome.status == "stopped",
        )
        try:
            ack = self.client.complete(trial.trial_id, body)
        except (LeaseLost, ServerError) as error:
            logger.warning("%s: completion not recorded: %s", label, error)
            return
        logger.info("%s %s with value %s", label, ack.state, outcome.value)

    def _send_fail(self, trial: protocol.TrialAssignment, error: str, retryable: bool) -> None:
        try:
            self.client.fail(trial.trial_id, protocol.FailRequest(
                lease_id=trial.lease_id, error=error[-20000:], retryable=retryable))
        except (LeaseLost, ServerError) as problem:
            logger.warning("trial %d: failure not recorded: %s", trial.number, problem)

    def _heartbeat(self, trial: protocol.TrialAssignment, finished: threading.Event,
                   told_to_stop: threading.Event) -> None:
        while not finished.wait(trial.heartbeat_s):
            try:
                decision = self.client.heartbeat(trial.trial_id, trial.lease_id)
            except Exception as error:  # the next beat tries again; the lease has slack
                logger.warning("heartbeat for trial %d failed: %s", trial.number, error)
                continue
            if decision.action == "stop":
                logger.info("trial %d told to stop: %s", trial.number, decision.reason)
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
