"""Checkpoints: a run resumed from one is the run that was never interrupted."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from clrsearch.spec import CyclicParams, OptimizerSpec
from tests.unit.test_training import CPU, tiny_data, tiny_task
from worker.checkpoint import CheckpointStore
from worker.training import Ending, EpochResult, train_trial

EPOCHS = 5

CASES = {
    "triangular-sgd": (
        CyclicParams(base_lr=0.01, max_lr=0.1, step_size_up=1.4, step_size_down=0.6,
                     step_size_unit="epochs"),
        OptimizerSpec(name="sgd"),
    ),
    "triangular2-adamw": (
        CyclicParams(base_lr=0.001, max_lr=0.01, step_size_up=3, step_size_unit="iterations",
                     mode="triangular2"),
        OptimizerSpec(name="adamw"),
    ),
    "exp_range-scale-mode-cycle": (
        CyclicParams(base_lr=0.01, max_lr=0.05, step_size_up=1, step_size_unit="epochs",
                     mode="exp_range", gamma=0.9, scale_mode="cycle"),
        OptimizerSpec(name="sgd", nesterov=True),
    ),
    "no-momentum-cycling": (
        CyclicParams(base_lr=0.01, max_lr=0.1, step_size_up=2, step_size_unit="iterations",
                     cycle_momentum=False),
        OptimizerSpec(name="sgd"),
    ),
}


def timeless(epochs: list[EpochResult]) -> list[EpochResult]:
    return [dataclasses.replace(epoch, duration_s=0.0) for epoch in epochs]


def run(params, task, store=None, stop_after_epochs=None, answers=None):
    """train_trial on the tiny data; `stop_after_epochs` plays a worker lost at that point."""
    reported: list[EpochResult] = []
    answers = list(answers or [])

    def on_epoch(result: EpochResult) -> str:
        reported.append(result)
        return answers.pop(0) if answers else "continue"

    def should_stop() -> bool:
        return stop_after_epochs is not None and len(reported) >= stop_after_epochs

    outcome = train_trial(params, task, "val_loss", tiny_data(), CPU, on_epoch, should_stop,
                          checkpoint=store)
    return outcome, reported


def store_in(folder: Path, number: int = 3) -> CheckpointStore:
    return CheckpointStore(folder, "study-1", number)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lost_after", [1, 3])
def test_resumed_run_has_the_lrs_momentums_and_losses_of_an_uninterrupted_run(
    case: str, lost_after: int, tmp_path: Path
):
    params, optimizer = CASES[case]
    task = tiny_task(epochs=EPOCHS, optimizer=optimizer)
    uninterrupted, _ = run(params, task)

    interrupted, _ = run(params, task, store_in(tmp_path), stop_after_epochs=lost_after)
    resumed, reported = run(params, task, store_in(tmp_path))

    assert (interrupted.status, interrupted.epochs_run) == ("stopped", lost_after)
    assert resumed.status == "complete"
    assert timeless(resumed.epochs) == timeless(uninterrupted.epochs)
    assert [epoch.epoch for epoch in reported] == list(range(1, EPOCHS + 1))
    assert resumed.value == uninterrupted.value


def test_run_lost_in_the_middle_of_an_epoch_resumes_from_the_last_whole_epoch(tmp_path: Path):
    # One-sample batches, 60 steps an epoch: should_stop is asked every 50 steps, so the
    # stop lands in the middle of the second epoch.
    task = tiny_task(epochs=3, batch_size=1)
    data = tiny_data(train=60)
    params = CyclicParams(base_lr=0.01, max_lr=0.1, step_size_up=0.7, step_size_unit="epochs")
    asked = []

    def stop_at_third_question() -> bool:
        asked.append(True)
        return len(asked) == 3

    uninterrupted = train_trial(params, task, "val_loss", data, CPU, lambda _: "continue")
    lost = train_trial(params, task, "val_loss", data, CPU, lambda _: "continue",
                       stop_at_third_question, checkpoint=store_in(tmp_path))
    resumed = train_trial(params, task, "val_loss", data, CPU, lambda _: "continue",
                          checkpoint=store_in(tmp_path))

    assert (lost.status, lost.epochs_run) == ("stopped", 1)
    lrs = [lr for epoch in resumed.epochs for lr in epoch.lrs]
    assert lrs == [lr for epoch in uninterrupted.epochs for lr in epoch.lrs]
    assert len(lrs) == 180
    assert timeless(resumed.epochs) == timeless(uninterrupted.epochs)


def test_checkpoint_after_the_last_epoch_only_reports_again(tmp_path: Path):
    params, optimizer = CASES["triangular-sgd"]
    task = tiny_task(epochs=2, optimizer=optimizer)
    first, _ = run(params, task, store_in(tmp_path))
    calls = []

    def on_epoch(result: EpochResult) -> str:
        calls.append(result.epoch)
        return "continue"

    def never_train() -> bool:
        raise AssertionError("a finished checkpoint trained again")

    again = train_trial(params, task, "val_loss", tiny_data(), CPU, on_epoch, never_train,
                        checkpoint=store_in(tmp_path))

    assert (again.status, again.value, calls) == ("complete", first.value, [1, 2])
    assert again.epochs == first.epochs


def test_resumed_run_whose_answers_come_later_reports_again_and_hears_a_late_prune(
    tmp_path: Path
):
    params, optimizer = CASES["triangular-sgd"]
    task = tiny_task(epochs=4, optimizer=optimizer)
    run(params, task, store_in(tmp_path), stop_after_epochs=2)
    reported: list[EpochResult] = []

    def on_epoch(result: EpochResult) -> None:
        reported.append(result)

    def ending(wait: bool) -> Ending | None:
        # The answer to the second report again comes in once training has gone on.
        return Ending("prune", 2) if len(reported) >= 2 else None

    outcome = train_trial(params, task, "val_loss", tiny_data(), CPU, on_epoch,
                          checkpoint=store_in(tmp_path), ending=ending)

    assert [epoch.epoch for epoch in reported] == [1, 2]
    assert (outcome.status, outcome.epochs_run) == ("pruned", 2)
    assert outcome.epochs == reported


def test_prune_answer_to_a_reported_again_epoch_ends_the_trial_as_pruned(tmp_path: Path):
    params, optimizer = CASES["triangular-sgd"]
    task = tiny_task(epochs=4, optimizer=optimizer)
    run(params, task, store_in(tmp_path), stop_after_epochs=2)

    outcome, reported = run(params, task, store_in(tmp_path), answers=["continue", "prune"])

    assert (outcome.status, outcome.epochs_run, len(reported)) == ("pruned", 2, 2)


def test_checkpoint_holds_the_full_trial_and_is_replaced_whole(tmp_path: Path):
    params, optimizer = CASES["triangular-sgd"]
    task = tiny_task(epochs=2, optimizer=optimizer)
    store = store_in(tmp_path, number=7)

    run(params, task, store)

    assert store.path == tmp_path / "study-1" / "trial-7.pt"
    assert [path.name for path in store.path.parent.iterdir()] == ["trial-7.pt"]
    payload = torch.load(store.path, weights_only=True)
    assert payload["config"]["params"] == params.model_dump(mode="json")
    assert payload["config"]["task"] == task.model_dump(mode="json")
    assert (payload["epoch"], payload["iteration"], len(payload["epochs"])) == (2, 10, 2)
    assert {"model", "optimizer", "scheduler", "torch_rng", "shuffle_rng"} <= set(payload)


def test_damaged_checkpoint_is_ignored_with_a_warning(tmp_path: Path, caplog):
    params, optimizer = CASES["triangular-sgd"]
    task = tiny_task(epochs=2, optimizer=optimizer)
    store = store_in(tmp_path)
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(b"half a checkpoint")
    fresh, _ = run(params, task)

    with caplog.at_level(logging.WARNING, logger="worker.checkpoint"):
        outcome, _ = run(params, task, store)

    assert "cannot be read" in caplog.text and "trial 3 of study 'study-1'" in caplog.text
    assert timeless(outcome.epochs) == timeless(fresh.epochs)


def test_checkpoint_of_other_parameters_is_not_resumed(tmp_path: Path, caplog):
    params, optimizer = CASES["triangular-sgd"]
    task = tiny_task(epochs=3, optimizer=optimizer)
    run(params, task, store_in(tmp_path), stop_after_epochs=2)
    other = params.model_copy(update={"max_lr": 0.2})
    fresh, _ = run(other, task)

    with caplog.at_level(logging.WARNING, logger="worker.checkpoint"):
        outcome, reported = run(other, task, store_in(tmp_path))

    assert "another configuration" in caplog.text
    assert timeless(outcome.epochs) == timeless(fresh.epochs)
    assert len(reported) == 3


def test_delete_removes_the_checkpoint_and_tolerates_its_absence(tmp_path: Path):
    params, optimizer = CASES["triangular-sgd"]
    store = store_in(tmp_path)
    run(params, tiny_task(epochs=1, optimizer=optimizer), store)

    store.delete()
    store.delete()

    assert not store.path.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resumed_run_on_cuda_has_the_schedule_of_an_uninterrupted_run(tmp_path: Path):
    # Kernels on a GPU need not be deterministic, so losses agree only closely; the
    # schedule depends on the step count alone and must agree exactly.
    cuda = torch.device("cuda")
    params, optimizer = CASES["triangular2-adamw"]
    task = tiny_task(epochs=4, optimizer=optimizer, model="cnn")
    reported: list[EpochResult] = []

    def on_epoch(result: EpochResult) -> str:
        reported.append(result)
        return "continue"

    uninterrupted = train_trial(params, task, "val_loss", tiny_data(), cuda, lambda _: "continue")
    train_trial(params, task, "val_loss", tiny_data(), cuda, on_epoch, lambda: len(reported) >= 2,
                checkpoint=store_in(tmp_path))
    resumed = train_trial(params, task, "val_loss", tiny_data(), cuda, lambda _: "continue",
                          checkpoint=store_in(tmp_path))

    assert [epoch.lrs for epoch in resumed.epochs] == [e.lrs for e in uninterrupted.epochs]
    assert [epoch.momentums for epoch in resumed.epochs] == [
        e.momentums for e in uninterrupted.epochs]
    assert [epoch.val_loss for epoch in resumed.epochs] == pytest.approx(
        [epoch.val_loss for epoch in uninterrupted.epochs], rel=1e-4)
