"""Reports go out while training goes on; the server's answer is applied when it comes.

These run a real `Worker` with its real `Outbox` and `Spool` against a fake client (as
`test_spool.py` does), on digits with the `mlp`: 1,437 training images, so 90 optimizer
steps an epoch at batch 16 and 23 at batch 64.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from clrsearch import protocol
from clrsearch.spec import CyclicParams, TaskSpec
from tests.unit.test_spool import FakeServer, worker_with
from worker.checkpoint import CheckpointStore
from worker.data import DatasetCache
from worker.loop import Worker
from worker.training import CHECK_EVERY_STEPS, EpochResult, train_trial

LEASE = "lease-7"
# Long enough for a slow machine, short enough that a blocking worker fails, not hangs.
PATIENCE_S = 10.0


class HoldingServer(FakeServer):
    """A `FakeServer` that keeps every body and can hold a report's answer back."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: dict[tuple[str, Any], dict] = {}
        # Run, on the delivering thread, before the report of that epoch is answered.
        self.before_answer: dict[int, Callable[[], None]] = {}

    def send_result(self, call: str, trial_id: int, body: dict, patience_s=None):
        if call == "report" and body["epoch"] in self.before_answer:
            self.before_answer.pop(body["epoch"])()
        self.bodies[(call, body.get("epoch"))] = body
        return super().send_result(call, trial_id, body, patience_s)

    def results(self) -> list[tuple[str, Any]]:
        return [(call, epoch) for call, _, epoch in self.calls if not call.startswith("claim")]


def trial(epochs: int, batch_size: int, attempt: int = 1) -> protocol.TrialAssignment:
    return protocol.TrialAssignment(
        trial_id=17, lease_id=f"{LEASE}-{attempt}", study_name="async", number=7,
        attempt=attempt, params=CyclicParams(base_lr=0.01, max_lr=0.1, step_size_up=1),
        task=TaskSpec(model="mlp", epochs=epochs, batch_size=batch_size),
        objective="val_loss", lease_s=60, heartbeat_s=30,
    )


def worker_for(server: HoldingServer, assignment: protocol.TrialAssignment, tmp_path: Path,
               **settings: Any) -> Worker:
    """A worker whose one claim gets `assignment`; it leaves when there is no more."""
    server.claims = [assignment]
    return worker_with(server, tmp_path, **settings)


def when_posted(worker: Worker, epoch: int, event: threading.Event) -> None:
    """Set `event` once the report of `epoch` is in the spool."""
    post = worker.outbox.post

    def post_and_tell(call, assignment, body, on_delivery=None):
        posted = post(call, assignment, body, on_delivery)
        if call == "report" and body.epoch == epoch:
            event.set()
        return posted

    worker.outbox.post = post_and_tell  # type: ignore[method-assign]


def held_until(event: threading.Event) -> Callable[[], None]:
    def hold() -> None:
        assert event.wait(PATIENCE_S), "training did not go on while a report was unanswered"
    return hold


def test_training_goes_on_while_a_report_waits_for_its_answer(tmp_path):
    server = HoldingServer()
    second_spooled = threading.Event()
    server.before_answer[1] = held_until(second_spooled)
    worker = worker_for(server, trial(epochs=3, batch_size=64), tmp_path)
    when_posted(worker, 2, second_spooled)

    assert worker.run() == 1

    assert second_spooled.is_set()
    assert server.results() == [("report", 1), ("report", 2), ("report", 3),
                                ("complete", None)]
    assert server.bodies[("complete", None)]["pruned"] is False


def test_prune_answer_arriving_mid_epoch_ends_the_trial_at_the_next_check(
    tmp_path
):
    server = HoldingServer()
    server.answers[("report", 1)] = "prune"
    answer_now = threading.Event()
    server.before_answer[1] = held_until(answer_now)
    worker = worker_for(server, trial(epochs=3, batch_size=16), tmp_path)
    steps: list[int] = []

    def on_step(_optimizer, _args, _kwargs) -> None:
        steps.append(len(steps))
        if len(steps) == 95:
            # Five steps into epoch 2 the server answers epoch 1's report; the step waits
            # for the answer to reach the outbox, so that the check at step 100 is the
            # first that can hear it.
            answer_now.set()
            deadline = time.monotonic() + PATIENCE_S
            while worker.outbox.ended(f"{LEASE}-1") is None:
                assert time.monotonic() < deadline, "the prune answer never reached the outbox"
                time.sleep(0.001)

    hook = register_optimizer_step_pre_hook(on_step)
    try:
        assert worker.run() == 1
    finally:
        hook.remove()

    assert CHECK_EVERY_STEPS == 50
    assert len(steps) == 100  # 90 of epoch 1, 10 of epoch 2, which is dropped
    assert server.results() == [("report", 1), ("complete", None)]
    completion = server.bodies[("complete", None)]
    assert (completion["pruned"], completion["stopped"]) == (True, False)
    assert completion["value"] == server.bodies[("report", 1)]["val_loss"]
    assert len(worker.spool) == 0


def test_reports_spooled_after_a_prune_answer_are_dropped_unsent(
    tmp_path, caplog
):
    server = HoldingServer()
    server.answers[("report", 1)] = "prune"
    third_spooled = threading.Event()
    server.before_answer[1] = held_until(third_spooled)
    worker = worker_for(server, trial(epochs=5, batch_size=64), tmp_path)
    when_posted(worker, 3, third_spooled)

    with caplog.at_level(logging.INFO, logger="worker"):
        assert worker.run() == 1

    assert third_spooled.is_set()
    assert server.results() == [("report", 1), ("complete", None)]
    assert "epoch 2 report dropped: the server already ended the trial (prune)" in caplog.text
    assert "epoch 3 report dropped: the server already ended the trial (prune)" in caplog.text
    completion = server.bodies[("complete", None)]
    assert completion["pruned"] is True
    assert completion["value"] == server.bodies[("report", 1)]["val_loss"]
    assert list(worker.spool.folder.glob("*.json")) == []


def test_completion_waits_for_the_last_reports_answer_and_honours_a_prune(tmp_path):
    server = HoldingServer()
    server.answers[("report", 2)] = "prune"
    server.before_answer[2] = lambda: time.sleep(0.3)

    assert worker_for(server, trial(epochs=2, batch_size=64), tmp_path).run() == 1

    assert server.results() == [("report", 1), ("report", 2), ("complete", None)]
    completion = server.bodies[("complete", None)]
    assert completion["pruned"] is True
    assert completion["value"] == server.bodies[("report", 2)]["val_loss"]


def test_stop_answer_arriving_late_ends_the_trial_as_stopped(tmp_path):
    server = HoldingServer()
    server.answers[("report", 2)] = "stop"
    third_spooled = threading.Event()
    server.before_answer[2] = held_until(third_spooled)
    worker = worker_for(server, trial(epochs=6, batch_size=64), tmp_path)
    when_posted(worker, 3, third_spooled)

    assert worker.run() == 1

    assert server.results() == [("report", 1), ("report", 2), ("complete", None)]
    completion = server.bodies[("complete", None)]
    assert (completion["pruned"], completion["stopped"]) == (False, True)
    assert completion["value"] == server.bodies[("report", 2)]["val_loss"]


def lost_attempt(tmp_path: Path, assignment: protocol.TrialAssignment, epochs_done: int
                 ) -> list[EpochResult]:
    """The first attempt, trained until it was lost after `epochs_done` epochs."""
    reported: list[EpochResult] = []

    def on_epoch(result: EpochResult) -> str:
        reported.append(result)
        return "continue"

    assert assignment.params is not None
    store = CheckpointStore(tmp_path / "checkpoints", assignment.study_name, assignment.number)
    data = DatasetCache(tmp_path / "data").get(assignment.task)
    train_trial(assignment.params, assignment.task, assignment.objective, data,
                torch.device("cpu"), on_epoch, lambda: len(reported) >= epochs_done, store)
    return reported


def test_resumed_trial_reports_its_saved_epochs_again_then_trains_on(tmp_path):
    first = lost_attempt(tmp_path, trial(epochs=3, batch_size=64), epochs_done=2)
    server = HoldingServer()
    worker = worker_for(server, trial(epochs=3, batch_size=64, attempt=2), tmp_path,
                        checkpoint_dir=tmp_path / "checkpoints")

    assert worker.run() == 1

    assert server.results() == [("report", 1), ("report", 2), ("report", 3),
                                ("complete", None)]
    for result in first:
        body = server.bodies[("report", result.epoch)]
        assert body["lease_id"] == f"{LEASE}-2"
        assert (body["val_loss"], body["lrs"]) == (result.val_loss, result.lrs)
    assert server.bodies[("complete", None)]["pruned"] is False
    assert not (tmp_path / "checkpoints" / "async" / "trial-7.pt").exists()


def test_late_prune_of_a_reported_again_epoch_ends_the_resumed_trial_there(
    tmp_path
):
    first = lost_attempt(tmp_path, trial(epochs=4, batch_size=64), epochs_done=2)
    server = HoldingServer()
    server.answers[("report", 1)] = "prune"
    second_spooled = threading.Event()
    server.before_answer[1] = held_until(second_spooled)
    worker = worker_for(server, trial(epochs=4, batch_size=64, attempt=2), tmp_path,
                        checkpoint_dir=tmp_path / "checkpoints")
    when_posted(worker, 2, second_spooled)

    assert worker.run() == 1

    assert server.results() == [("report", 1), ("complete", None)]
    completion = server.bodies[("complete", None)]
    assert completion["pruned"] is True
    assert completion["value"] == first[0].val_loss
