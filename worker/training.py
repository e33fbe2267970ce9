"""The training loop of one trial. It knows nothing of HTTP.

`train_trial` is handed the trial's parameters and task, the prepared data and small
callables. `on_epoch` reports an epoch and returns the server's answer (`continue`,
`prune` or `stop`), or None when the answer comes later: the report is on its way and
training goes on at once. `ending` then says whether such an answer has ended the trial
(an `Ending`: `prune` or `stop`, and the epoch whose report it answered); it is asked
at every `should_stop` check (every `CHECK_EVERY_STEPS` optimizer steps) and at every
epoch's end, and after the last epoch it is asked to wait for the answers still due, so
that a prune on the last report counts. A trial ended so keeps the epochs up to the one
answered; an epoch trained past it, whole or in part, is dropped unreported.
`should_stop` says whether the worker has been asked to quit. The same loop serves the
worker, the benchmarks and the tests.

With a `CheckpointStore` it saves its state after every epoch and, when the store holds
a checkpoint of the same trial, resumes from it: the epochs already done are handed to
`on_epoch` again (the server records an epoch once and answers a repeat as it answered
the first), and training goes on from the next epoch with the same LR, weights, batch
order and random numbers as a run that was never interrupted.

The LR of every step is torch's `CyclicLR` value for that step: the scheduler is
stepped once after every optimizer step, including the last, partial batch of an
epoch, and the LR and momentum recorded for a step are the ones that step applied.

`task.precision` picks the arithmetic of forward and loss (validation too): `auto` is
bfloat16 autocast on a CUDA device that supports it and float32 everywhere else, so CPU
results are those of plain float32; `bfloat16` on a device without it raises
`PrecisionUnavailable`. bfloat16 keeps float32's exponent range, so no gradient scaler
is needed; weights, gradients and the optimizer stay float32.

Errors: `TrainingDiverged` (a `ValueError`) when a loss turns NaN or infinite; a
retry with the same parameters would diverge again. `PrecisionUnavailable` (a
`ValueError`) when `task.precision` asks for what this device cannot do; another
worker's device may.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from clrsearch.spec import BaselineParams, CyclicParams, TaskSpec
from worker.baselines import build_baseline_scheduler
from worker.checkpoint import CheckpointStore, TrainingState
from worker.data import PreparedData
from worker.models import build_model
from worker.schedule import build_optimizer, build_scheduler, momentum_of

logger = logging.getLogger(__name__)

# How often, in optimizer steps, to ask should_stop and to check the loss for NaN. The
# check costs a host sync on an accelerator, so it is not done every step.
CHECK_EVERY_STEPS = 50
# Validation needs no gradients, so it can take much larger batches than training.
MIN_EVAL_BATCH_SIZE = 1024

OBJECTIVES = ("val_loss", "val_accuracy")
ANSWERS = ("continue", "prune", "stop")


class TrainingDiverged(ValueError):
    """A loss became NaN or infinite; the message names the epoch, the step and the LR."""


class PrecisionUnavailable(ValueError):
    """`task.precision` is `bfloat16` and this device cannot compute in it."""


@dataclass
class EpochResult:
    """One epoch's results: `clrsearch.protocol.EpochReport` without the lease."""

    epoch: int
    # Optimizer steps since the start of the trial, at the end of this epoch.
    iterations: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    duration_s: float
    # The LR and momentum (beta1 for AdamW) applied at each optimizer step of this epoch.
    lrs: list[float]
    momentums: list[float]


@dataclass(frozen=True)
class Ending:
    """The server ended the trial: its `answer` to the report of `epoch`."""

    answer: Literal["prune", "stop"]
    epoch: int


def no_ending(wait: bool) -> Ending | None:
    """`ending` for an `on_epoch` that always answers at once: no answer comes later."""
    return None


@dataclass
class TrialOutcome:
    status: Literal["complete", "pruned", "stopped"]
    # The objective at the last epoch run; None when stopped before the first epoch ended.
    value: float | None
    epochs_run: int
    epochs: list[EpochResult]


def batches_per_epoch(train_count: int, batch_size: int) -> int:
    """Optimizer steps per epoch: nothing is dropped, a last partial batch is a step."""
    return math.ceil(train_count / batch_size)


def batch_bounds(train_count: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of each batch. A last batch of one sample is evened out with the one
    before it, because BatchNorm cannot train on a single sample (resnet, mobilenet)."""
    sizes = [batch_size] * batches_per_epoch(train_count, batch_size)
    sizes[-1] = train_count - (len(sizes) - 1) * batch_size
    if sizes[-1] == 1 and len(sizes) > 1:
        pair = sizes[-2] + 1
        sizes[-2], sizes[-1] = pair - pair // 2, pair // 2
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def train_trial(
    params: CyclicParams | BaselineParams,
    task: TaskSpec,
    objective: str,
    data: PreparedData,
    device: torch.device,
    on_epoch: Callable[[EpochResult], str | None],
    should_stop: Callable[[], bool] = lambda: False,
    checkpoint: CheckpointStore | None = None,
    ending: Callable[[bool], Ending | None] = no_ending,
) -> TrialOutcome:
    """Train `task.model` on `data` under the trial's CyclicLR (or a baseline's schedule)
    and report every epoch.

    `on_epoch(result)` returns the answer to the report, or None when it comes later
    through `ending(wait)`; `ending(False)` must not block, `ending(True)` may wait for
    every report's answer (or for the server to be found away).

    Deterministic on the CPU: the same arguments give the same results, and a run resumed
    from a `checkpoint` gives the same epochs as one that was never interrupted. The
    checkpoint is left in place at the end: the caller deletes it once the outcome is
    safely recorded.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    compute_dtype = autocast_dtype(task.precision, device)

    # Build model, optimizer and schedule
    data = data.to(device)
    train_count = len(data.train_y)
    steps = batches_per_epoch(train_count, task.batch_size)
    model, optimizer, scheduler, shuffle = _build(params, task, data, device, steps)
    bounds = batch_bounds(train_count, task.batch_size)
    batch_sizes = torch.tensor([end - start for start, end in bounds], dtype=torch.float32,
                               device=device)
    eval_batch_size = max(task.batch_size, MIN_EVAL_BATCH_SIZE)

    # Resume from a checkpoint, and report its epochs again: the lost attempt may have
    # saved an epoch and died before its report reached the server
    config = trial_config(params, task, objective)
    epochs: list[EpochResult] = []
    iteration = 0
    saved = checkpoint.load(config) if checkpoint is not None else None
    if checkpoint is not None and saved is not None:
        try:
            epochs, iteration = _restore(saved, model, optimizer, scheduler, shuffle, device,
                                         steps)
        except (RuntimeError, KeyError, ValueError, TypeError) as error:
            # A state that passed the format and configuration checks and still does not
            # load (a model whose layers changed between versions): a fresh start is right.
            logger.warning("%s: checkpoint %s does not fit (%s); starting afresh",
                           checkpoint.label, checkpoint.path, error)
            model, optimizer, scheduler, shuffle = _build(params, task, data, device, steps)
            epochs, iteration = [], 0
        for index, result in enumerate(epochs):
            answered = _ending(on_epoch(result))
            if answered is not None:
                return _outcome(answered, epochs[: index + 1], objective)

    for epoch in range(len(epochs) + 1, task.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(train_count, generator=shuffle).to(device)
        # Losses stay on the device until the epoch ends: reading one per step would
        # force a host sync per step.
        step_losses = torch.empty(steps, device=device)
        lrs: list[float] = []
        momentums: list[float] = []

        for step in range(steps):
            # Hear a late answer that ended the trial, stop when asked, and give up early
            # on a diverged run
            if iteration % CHECK_EVERY_STEPS == 0:
                heard = ending(False)
                if heard is not None:
                    logger.debug("training ends at epoch %d, step %d: the report of epoch %d "
                                 "was answered %s", epoch, step, heard.epoch, heard.answer)
                    return _ended(heard, epochs, objective)
                if should_stop():
                    logger.info("training stopped on request at epoch %d, step %d", epoch, step)
                    return _outcome("stopped", epochs, objective)
                if step > 0:
                    _check_finite(step_losses[:step], epoch, steps, iteration - step, lrs)

            # Record the LR and momentum this step applies. CyclicLR keeps them as Python
            # floats, so reading them is no sync (a tensor LR on the device would be one)
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            momentums.append(momentum_of(optimizer))

            # Forward (in the task's precision) and backward (gathering a batch by an
            # index tensor on the device is no sync)
            start, end = bounds[step]
            index = order[start:end]
            with _autocast(compute_dtype, device):
                loss = F.cross_entropy(model(data.train_x[index]), data.train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()

            # Step the optimizer, then the schedule: CyclicLR counts optimizer steps
            optimizer.step()
            scheduler.step()
            step_losses[step] = loss.detach()
            iteration += 1

        # Training loss of the epoch (host sync)
        _check_finite(step_losses, epoch, steps, iteration - steps, lrs)
        train_loss = float((step_losses * batch_sizes).sum().item()) / train_count

        # Evaluate (host sync)
        with _autocast(compute_dtype, device):
            val_loss, val_accuracy = _evaluate(model, data.val_x, data.val_y, eval_batch_size)
        if not math.isfinite(val_loss):
            raise TrainingDiverged(
                f"validation loss is {val_loss} after epoch {epoch} (training loss "
                f"{train_loss:.4g}, last lr {lrs[-1]:.6g}); the LR may be too high, try a lower "
                "max_lr"
            )

        # Hear what came in while the epoch ran: a trial the server has ended gets no
        # more epochs, and this one is dropped unreported
        heard = ending(False)
        if heard is not None:
            logger.debug("training ends after epoch %d: the report of epoch %d was answered "
                         "%s", epoch, heard.epoch, heard.answer)
            return _ended(heard, epochs, objective)

        result = EpochResult(
            epoch=epoch,
            iterations=iteration,
            train_loss=train_loss,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            duration_s=time.perf_counter() - started,
            lrs=lrs,
            momentums=momentums,
        )
        epochs.append(result)
        logger.debug(
            "epoch %d: train_loss %.4f, val_loss %.4f, val_accuracy %.4f, %.2f s",
            epoch,
            train_loss,
            val_loss,
            val_accuracy,
            result.duration_s,
        )

        # Save a checkpoint before reporting, so that a worker lost between the two leaves
        # the epoch to its retry (host sync: the state is copied off the device)
        if checkpoint is not None:
            checkpoint.save(_state(config, epochs, iteration, model, optimizer, scheduler,
                                   shuffle, device))

        # Report, and follow the answer if it comes at once
        answered = _ending(on_epoch(result))
        if answered is not None:
            return _outcome(answered, epochs, objective)
        if epoch < task.epochs and should_stop():
            logger.info("training stopped on request after epoch %d", epoch)
            return _outcome("stopped", epochs, objective)

    # The answers still due decide how the trial ended: a prune on the last report counts
    heard = ending(True)
    if heard is not None:
        return _ended(heard, epochs, objective)
    return _outcome("complete", epochs, objective)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype that forward and loss autocast to under `task.precision` on `device`, or
    None for plain float32. Raises `PrecisionUnavailable` for bfloat16 without support."""
    if precision == "float32":
        return None
    supported = False
    if device.type == "cuda":
        # Asked of this device, not the current one; emulated bfloat16 (CUDA devices
        # before Ampere) is slower than float32, so it does not count.
        with torch.cuda.device(device):
            supported = torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "auto":
        return torch.bfloat16 if supported else None
    if precision == "bfloat16":
        if not supported:
            raise PrecisionUnavailable(
                f"task.precision is 'bfloat16', but this worker's device ({device}) cannot "
                "compute in bfloat16: it needs a CUDA device of compute capability 8.0 or "
                "newer. Set task.precision to 'auto' (bfloat16 where supported, float32 "
                "elsewhere) or 'float32', or run the study on such GPU workers"
            )
        return torch.bfloat16
    raise ValueError(f"task.precision must be auto, float32 or bfloat16, got {precision!r}")


def _autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    # float32 runs outside autocast altogether, so that CPU results stay bit for bit
    # those of a plain loop.
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def trial_config(
    params: CyclicParams | BaselineParams, task: TaskSpec, objective: str
) -> dict[str, Any]:
    """Everything that makes one trial's training what it is, as plain JSON values."""
    return {
        "params": params.model_dump(mode="json"),
        "task": task.model_dump(mode="json"),
        "objective": objective,
    }


def _build(
    params: CyclicParams | BaselineParams, task: TaskSpec, data: PreparedData,
    device: torch.device, steps: int,
) -> tuple[nn.Module, torch.optim.Optimizer, LRScheduler, torch.Generator]:
    """Model, optimizer, schedule and shuffling generator, all at their seeded start."""
    torch.manual_seed(task.seed)
    model = build_model(task.model, data.in_channels, data.image_size, data.num_classes)
    model = model.to(device)
    if isinstance(params, BaselineParams):
        optimizer = build_optimizer(model.parameters(), task.optimizer, lr=params.lr)
        scheduler: LRScheduler = build_baseline_scheduler(optimizer, params, steps * task.epochs)
    else:
        optimizer = build_optimizer(model.parameters(), task.optimizer, lr=params.base_lr)
        scheduler = build_scheduler(optimizer, params, steps)
    # A generator of its own, so that shuffling does not depend on what else draws
    # random numbers (dropout, model initialisation).
    shuffle = torch.Generator().manual_seed(task.seed)
    return model, optimizer, scheduler, shuffle


def _state(
    config: dict[str, Any], epochs: list[EpochResult], iteration: int, model: nn.Module,
    optimizer: torch.optim.Optimizer, scheduler: LRScheduler, shuffle: torch.Generator,
    device: torch.device,
) -> TrainingState:
    return TrainingState(
        config=config,
        epoch=len(epochs),
        iteration=iteration,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        shuffle_rng=shuffle.get_state(),
        epochs=[dataclasses.asdict(result) for result in epochs],
    )


def _restore(
    saved: TrainingState, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler, shuffle: torch.Generator, device: torch.device, steps: int,
) -> tuple[list[EpochResult], int]:
    """Put the saved state into freshly built objects; returns the epochs and iterations."""
    if saved.iteration != saved.epoch * steps or len(saved.epochs) != saved.epoch:
        raise ValueError(f"{saved.epoch} epochs with {saved.iteration} iterations and "
                         f"{len(saved.epochs)} results do not fit {steps} steps per epoch")
    model.load_state_dict(saved.model)
    scheduler.load_state_dict(saved.scheduler)
    # The optimizer goes last: building CyclicLR (above, in _build) set the LR and the
    # momentum to the cycle's start, and loading the scheduler's state does not undo
    # that; the optimizer's own state holds the values the next step applies.
    optimizer.load_state_dict(saved.optimizer)
    torch.set_rng_state(saved.torch_rng)
    if saved.cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state(saved.cuda_rng, device)
    shuffle.set_state(saved.shuffle_rng)
    return [EpochResult(**result) for result in saved.epochs], saved.iteration


def _ending(answer: str | None) -> Literal["pruned", "stopped"] | None:
    """What the server's answer to a report means for training: go on (None) or end.
    None is no answer yet: training goes on, and `ending` brings the answer later."""
    if answer is None:
        return None
    if answer == "prune":
        return "pruned"
    if answer == "stop":
        return "stopped"
    if answer != "continue":
        raise ValueError(f"on_epoch answered {answer!r}; expected one of {', '.join(ANSWERS)}")
    return None


def _ended(heard: Ending, epochs: list[EpochResult], objective: str) -> TrialOutcome:
    """The outcome of a trial ended by a late answer: the epochs up to the one answered."""
    status = _ending(heard.answer)
    if status is None:
        raise ValueError(f"ending gave the answer {heard.answer!r}; expected prune or stop")
    return _outcome(status, epochs[: heard.epoch], objective)


def _check_finite(
    step_losses: torch.Tensor, epoch: int, steps: int, first_iteration: int, lrs: list[float]
) -> None:
    """Raise `TrainingDiverged` at the first non-finite loss of this epoch (host sync)."""
    finite = torch.isfinite(step_losses)
    if bool(finite.all()):
        return
    step = int((~finite).nonzero()[0, 0])
    loss = float(step_losses[step])
    raise TrainingDiverged(
        f"training diverged at epoch {epoch}, step {step + 1} of {steps} (iteration "
        f"{first_iteration + step + 1}): the training loss is {loss} at lr {lrs[step]:.6g}; "
        "the LR may be too high, try a lower max_lr"
    )


@torch.no_grad()
def _evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the validation set."""
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device)
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        target = labels[start : start + batch_size]
        loss_sum += F.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(dim=1) == target).sum()
    # One transfer for both numbers.
    loss_total, correct_total = torch.stack([loss_sum, correct]).tolist()
    return loss_total / len(labels), correct_total / len(labels)


def _outcome(
    status: Literal["complete", "pruned", "stopped"], epochs: list[EpochResult], objective: str
) -> TrialOutcome:
    value = getattr(epochs[-1], objective) if epochs else None
    return TrialOutcome(status=status, value=value, epochs_run=len(epochs), epochs=epochs)
