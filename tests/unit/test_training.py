"""The training loop: the schedule it applies, its answers to the server, its results."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch

from clrsearch.protocol import EpochReport
from clrsearch.spec import CyclicParams, OptimizerSpec, TaskSpec
from tests.reference import torch_cyclic_reference
from worker.data import DatasetCache, PreparedData
from worker.training import (
    Ending,
    EpochResult,
    PrecisionUnavailable,
    TrainingDiverged,
    no_ending,
    train_trial,
)

CPU = torch.device("cpu")
GAMMA = 0.9


def tiny_data(train: int = 40, val: int = 10, seed: int = 0) -> PreparedData:
    """Three separable classes of 1 x 8 x 8 images."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(train + val) % 3
    images = torch.randn(train + val, 1, 8, 8, generator=generator) * 0.5
    images[:, 0, 0, :] += labels[:, None].float()
    return PreparedData(
        train_x=images[:train],
        train_y=labels[:train],
        val_x=images[train:],
        val_y=labels[train:],
        in_channels=1,
        image_size=8,
        num_classes=3,
    )


def tiny_task(**changes) -> TaskSpec:
    return TaskSpec(**{"model": "mlp", "epochs": 2, "batch_size": 8, **changes})


PARAMS = CyclicParams(base_lr=0.01, max_lr=0.1, step_size_up=1, step_size_unit="epochs")


def run(params=PARAMS, task=None, data=None, objective="val_loss", answers=None, **kwargs):
    """train_trial with every epoch answered from `answers` (default: continue)."""
    answers = list(answers or [])
    reported: list[EpochResult] = []

    def on_epoch(result: EpochResult) -> str:
        reported.append(result)
        return answers.pop(0) if answers else "continue"

    outcome = train_trial(
        params, task or tiny_task(), objective, data or tiny_data(), CPU, on_epoch, **kwargs
    )
    return outcome, reported


# The loop's batches per epoch are ceil(40 / 8) = 5, so the epoch step sizes below are
# 7 steps up and 3 down; the iteration step sizes are taken as they are.
STEP_SIZES = {"epochs": ((1.4, 0.6), (7, 3)), "iterations": ((3, 5), (3, 5))}
SCALE_FUNCTIONS = {
    "triangular": lambda x: 1.0,
    "triangular2": lambda x: 1 / (2.0 ** (x - 1)),
    "exp_range": lambda x: GAMMA**x,
}


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("unit", ["epochs", "iterations"])
@pytest.mark.parametrize("cycle_momentum", [True, False])
@pytest.mark.parametrize("scale_mode", [None, "cycle", "iterations"])
@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_applied_lr_matches_torch_cyclic_lr_for_every_mode(
    mode, scale_mode, cycle_momentum, unit, optimizer_name
):
    (up, down), (up_steps, down_steps) = STEP_SIZES[unit]
    params = CyclicParams(
        base_lr=0.01,
        max_lr=0.05,
        step_size_up=up,
        step_size_down=down,
        step_size_unit=unit,
        mode=mode,
        gamma=GAMMA,
        scale_mode=scale_mode,
        cycle_momentum=cycle_momentum,
    )
    task = tiny_task(epochs=4, optimizer=OptimizerSpec(name=optimizer_name))
    custom = {}
    if scale_mode is not None:
        custom = {"scale_fn": SCALE_FUNCTIONS[mode], "scale_mode": scale_mode}
    expected_lrs, expected_momentums = torch_cyclic_reference(
        optimizer_name,
        20,
        base_lr=0.01,
        max_lr=0.05,
        step_size_up=up_steps,
        step_size_down=down_steps,
        mode=mode,
        gamma=GAMMA,
        cycle_momentum=cycle_momentum,
        base_momentum=0.85,
        max_momentum=0.95,
        **custom,
    )

    outcome, _ = run(params, task)

    assert [len(epoch.lrs) for epoch in outcome.epochs] == [5, 5, 5, 5]
    assert [lr for epoch in outcome.epochs for lr in epoch.lrs] == expected_lrs
    assert [m for epoch in outcome.epochs for m in epoch.momentums] == expected_momentums


def test_last_partial_batch_is_a_step_and_iterations_accumulate():
    outcome, _ = run(task=tiny_task(epochs=3), data=tiny_data(train=41))

    assert [len(epoch.lrs) for epoch in outcome.epochs] == [6, 6, 6]
    assert [epoch.iterations for epoch in outcome.epochs] == [6, 12, 18]


def test_epoch_result_carries_every_field_of_the_epoch_report():
    outcome, _ = run()

    fields = {field.name for field in dataclasses.fields(EpochResult)}
    assert fields == set(EpochReport.model_fields) - {"lease_id"}
    EpochReport(lease_id="lease", **dataclasses.asdict(outcome.epochs[0]))


def test_completed_trial_reports_every_epoch_and_the_last_objective():
    outcome, reported = run(task=tiny_task(epochs=3), objective="val_accuracy")

    assert (outcome.status, outcome.epochs_run) == ("complete", 3)
    assert reported == outcome.epochs
    assert [epoch.epoch for epoch in reported] == [1, 2, 3]
    assert outcome.value == reported[-1].val_accuracy


def test_prune_answer_ends_training_as_pruned():
    outcome, reported = run(task=tiny_task(epochs=5), answers=["continue", "prune"])

    assert (outcome.status, outcome.epochs_run, len(reported)) == ("pruned", 2, 2)
    assert outcome.value == reported[-1].val_loss


def test_stop_answer_ends_training_as_stopped():
    outcome, reported = run(task=tiny_task(epochs=5), answers=["stop"])

    assert (outcome.status, outcome.epochs_run, len(reported)) == ("stopped", 1, 1)
    assert outcome.value == reported[0].val_loss


def test_unknown_answer_is_an_error():
    with pytest.raises(ValueError, match="'maybe'"):
        run(answers=["maybe"])


def test_stop_request_before_training_stops_with_no_value():
    outcome, reported = run(should_stop=lambda: True)

    assert (outcome.status, outcome.epochs_run, outcome.value) == ("stopped", 0, None)
    assert reported == []


def test_stop_request_is_heard_within_an_epoch():
    calls = []

    def should_stop() -> bool:
        calls.append(len(calls))
        return len(calls) == 2  # asked at step 0, then again 50 steps later

    # 60 single-sample batches: one epoch is 60 steps.
    outcome, reported = run(
        task=tiny_task(batch_size=1), data=tiny_data(train=60), should_stop=should_stop
    )

    assert (outcome.status, outcome.epochs_run) == ("stopped", 0)
    assert reported == []
    assert len(calls) == 2


def test_stop_request_is_heard_at_the_end_of_an_epoch():
    reported: list[EpochResult] = []

    def on_epoch(result: EpochResult) -> str:
        reported.append(result)
        return "continue"

    outcome = train_trial(
        PARAMS, tiny_task(epochs=4), "val_loss", tiny_data(), CPU, on_epoch, lambda: bool(reported)
    )

    assert (outcome.status, outcome.epochs_run) == ("stopped", 1)


def test_nan_loss_raises_training_diverged_naming_epoch_step_and_lr():
    data = tiny_data()
    data.train_x[:] = float("nan")

    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1 of 5 .*lr 0\.01\b"):
        run(data=data)


def test_same_seed_twice_gives_identical_epochs():
    task = TaskSpec(model="cnn", epochs=2, batch_size=16, optimizer=OptimizerSpec(name="adamw"))
    params = CyclicParams(base_lr=0.001, max_lr=0.01, step_size_up=1)

    first, _ = run(params, task)
    second, _ = run(params, task)
    other_seed, _ = run(params, task.model_copy(update={"seed": 1}))

    def timeless(outcome):
        return [dataclasses.replace(epoch, duration_s=0.0) for epoch in outcome.epochs]

    assert timeless(first) == timeless(second)
    assert timeless(first) != timeless(other_seed)


def test_training_on_digits_learns(tmp_path: Path):
    task = TaskSpec(epochs=2)
    data = DatasetCache(tmp_path).get(task)
    params = CyclicParams(base_lr=0.01, max_lr=0.1, step_size_up=1)

    outcome, _ = run(params, task, data)

    first, last = outcome.epochs
    assert last.val_loss < first.val_loss
    assert last.val_accuracy > 0.5


def late(answers: dict[int, Ending], waited: Ending | None = None):
    """An `ending` that hears answers[n] at its n-th question (counted from 1) and after,
    and `waited` when asked to wait; also returns the questions asked, as wait flags."""
    asked: list[bool] = []

    def ending(wait: bool) -> Ending | None:
        asked.append(wait)
        if wait and waited is not None:
            return waited
        heard = [answer for number, answer in answers.items() if number <= len(asked)]
        return heard[0] if heard else None

    return ending, asked


def run_unanswered(task, data=None, ending=no_ending, **kwargs):
    """train_trial whose on_epoch leaves every answer for later (returns None)."""
    reported: list[EpochResult] = []

    def on_epoch(result: EpochResult) -> None:
        reported.append(result)

    outcome = train_trial(PARAMS, task, "val_loss", data or tiny_data(), CPU, on_epoch,
                          ending=ending, **kwargs)
    return outcome, reported


def test_late_prune_heard_mid_epoch_keeps_exactly_the_epochs_up_to_the_pruned_one():
    # 60 single-sample batches an epoch: questions at step 0, step 50, the end of epoch 1,
    # then step 40 of epoch 2 (iteration 100), where the prune of epoch 1 is heard.
    ending, asked = late({4: Ending("prune", 1)})

    outcome, reported = run_unanswered(tiny_task(epochs=3, batch_size=1), tiny_data(train=60),
                                       ending)

    assert (outcome.status, outcome.epochs_run) == ("pruned", 1)
    assert [epoch.epoch for epoch in reported] == [1]
    assert outcome.epochs == reported
    assert outcome.value == reported[0].val_loss
    assert asked == [False] * 4


def test_late_prune_heard_at_an_epoch_end_drops_that_epoch_unreported():
    # Five steps an epoch: questions at step 0, then at each epoch's end.
    ending, asked = late({3: Ending("prune", 1)})

    outcome, reported = run_unanswered(tiny_task(epochs=4), ending=ending)

    assert (outcome.status, outcome.epochs_run) == ("pruned", 1)
    assert [epoch.epoch for epoch in reported] == [1]
    assert outcome.value == reported[0].val_loss
    assert len(asked) == 3


def test_late_stop_heard_mid_run_ends_the_trial_as_stopped_at_the_answered_epoch():
    ending, _ = late({4: Ending("stop", 2)})

    outcome, reported = run_unanswered(tiny_task(epochs=5), ending=ending)

    assert (outcome.status, outcome.epochs_run) == ("stopped", 2)
    assert [epoch.epoch for epoch in reported] == [1, 2]
    assert outcome.value == reported[1].val_loss


def test_answers_still_due_after_the_last_epoch_are_waited_for_and_a_prune_counts():
    ending, asked = late({}, waited=Ending("prune", 3))

    outcome, reported = run_unanswered(tiny_task(epochs=3), ending=ending)

    assert (outcome.status, outcome.epochs_run) == ("pruned", 3)
    assert outcome.epochs == reported
    assert asked[-1] is True and asked.count(True) == 1


def test_late_prune_of_an_earlier_epoch_heard_after_the_last_one_drops_the_later_epochs():
    ending, _ = late({}, waited=Ending("prune", 2))

    outcome, reported = run_unanswered(tiny_task(epochs=3), ending=ending)

    assert (outcome.status, outcome.epochs_run) == ("pruned", 2)
    assert outcome.epochs == reported[:2]
    assert outcome.value == reported[1].val_loss


def test_unanswered_reports_with_no_late_answer_train_every_epoch_as_answered_ones_do():
    answered, _ = run(task=tiny_task(epochs=3))
    unanswered, reported = run_unanswered(tiny_task(epochs=3))

    assert unanswered.status == "complete"
    assert len(reported) == 3
    assert [e.val_loss for e in unanswered.epochs] == [e.val_loss for e in answered.epochs]


def output_dtypes():
    """Records the dtype of every module's output while the returned hook is live."""
    dtypes: set[torch.dtype] = set()

    def record(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            dtypes.add(output.dtype)

    return dtypes, torch.nn.modules.module.register_module_forward_hook(record)


def test_auto_precision_on_the_cpu_is_plain_float32_bit_for_bit():
    task = tiny_task(epochs=2, model="cnn")
    dtypes, hook = output_dtypes()
    try:
        auto, _ = run(task=task)
    finally:
        hook.remove()
    float32, _ = run(task=task.model_copy(update={"precision": "float32"}))

    assert dtypes == {torch.float32}
    timeless = [dataclasses.replace(epoch, duration_s=0.0) for epoch in auto.epochs]
    assert timeless == [dataclasses.replace(epoch, duration_s=0.0) for epoch in float32.epochs]


def test_bfloat16_on_the_cpu_is_refused_naming_the_field_and_the_fix():
    with pytest.raises(PrecisionUnavailable, match=r"task.precision is 'bfloat16'.*Set "
                       r"task.precision to 'auto'.*'float32'") as raised:
        run(task=tiny_task(precision="bfloat16"))

    assert isinstance(raised.value, ValueError)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bfloat16", "auto"])
def test_bfloat16_on_cuda_autocasts_forward_and_trains(precision):
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this CUDA device has no native bfloat16")
    cuda = torch.device("cuda")
    # A gentle schedule, so that the two runs stay close enough to compare.
    params = CyclicParams(base_lr=0.001, max_lr=0.01, step_size_up=1, step_size_unit="epochs")
    task = tiny_task(epochs=3, model="cnn", precision=precision)
    dtypes, hook = output_dtypes()
    try:
        outcome = train_trial(params, task, "val_loss", tiny_data(), cuda, lambda _: "continue")
    finally:
        hook.remove()
    float32 = train_trial(params, task.model_copy(update={"precision": "float32"}),
                          "val_loss", tiny_data(), cuda, lambda _: "continue")

    assert torch.bfloat16 in dtypes
    assert outcome.status == "complete" and outcome.epochs_run == 3
    assert all(math.isfinite(e.train_loss) and math.isfinite(e.val_loss)
               for e in outcome.epochs)
    # Same schedule, nearby losses (within 1 % when bfloat16 is emulated on the CPU).
    assert [e.lrs for e in outcome.epochs] == [e.lrs for e in float32.epochs]
    assert [e.val_loss for e in outcome.epochs] == pytest.approx(
        [e.val_loss for e in float32.epochs], rel=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_steps_on_cuda_do_not_sync_with_the_host(monkeypatch):
    # Count the host syncs of two trials that differ only in steps per epoch (10 and 100),
    # with the periodic checks (a sync by design) moved out of reach: a sync in the step
    # itself would add one per step to the second.
    import worker.training

    monkeypatch.setattr(worker.training, "CHECK_EVERY_STEPS", 10**9)
    cuda = torch.device("cuda")
    data = tiny_data(train=400)

    def syncs(batch_size: int) -> int:
        task = tiny_task(epochs=2, batch_size=batch_size, precision="auto")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_trial(PARAMS, task, "val_loss", data, cuda, lambda _: "continue")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(warning.message) for warning in caught)

    syncs(40)  # CUDA, cuBLAS and the kernels warm up
    few, many = syncs(40), syncs(4)

    assert few > 0  # the epoch-end syncs are seen, so the count means something
    # One sync per step would add 180; a little slack for anything torch does once.
    assert many <= few + 2
