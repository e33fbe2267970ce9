"""Smith's LR range test: train while the LR rises, and record the smoothed loss.

The LR ramps from `start_lr` to `end_lr` over the test's epochs, exponentially by
default (so each decade gets as many steps). The loss is smoothed with an exponential
moving average, and the test stops once that exceeds `divergence_factor` times its
best value: past that point the curve says nothing more. The server reads the bounds
off the curve (`clrsearch.lr_bounds`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clrsearch.spec import RangeTestSpec, TaskSpec
from worker.data import PreparedData
from worker.models import build_model
from worker.schedule import build_optimizer
from worker.training import batch_bounds

logger = logging.getLogger(__name__)


@dataclass
class RangeTestResult:
    lrs: list[float]
    losses: list[float]
    diverged: bool


def ramp(test: RangeTestSpec, steps: int) -> list[float]:
    """The LR at each of `steps` steps, first start_lr, last end_lr."""
    if steps < 2:
        return [test.start_lr] * steps
    if test.ramp == "linear":
        return [test.start_lr + (test.end_lr - test.start_lr) * i / (steps - 1)
                for i in range(steps)]
    ratio = test.end_lr / test.start_lr
    return [test.start_lr * ratio ** (i / (steps - 1)) for i in range(steps)]


def run_range_test(
    test: RangeTestSpec, task: TaskSpec, data: PreparedData, device: torch.device,
    should_stop: Callable[[], bool] = lambda: False,
) -> RangeTestResult:
    torch.manual_seed(task.seed)
    data = data.to(device)
    model = build_model(task.model, data.in_channels, data.image_size, data.num_classes)
    model = model.to(device).train()
    optimizer = build_optimizer(model.parameters(), task.optimizer, lr=test.start_lr)
    bounds = batch_bounds(len(data.train_y), task.batch_size)
    lrs = ramp(test, len(bounds) * test.epochs)
    shuffle = torch.Generator().manual_seed(task.seed)

    recorded_lrs: list[float] = []
    smoothed: list[float] = []
    average = best = math.inf
    step = 0
    for _epoch in range(test.epochs):
        order = torch.randperm(len(data.train_y), generator=shuffle).to(device)
        for start, end in bounds:
            if should_stop():
                return RangeTestResult(recorded_lrs, smoothed, diverged=False)

            # Set this step's LR, then one ordinary training step
            for group in optimizer.param_groups:
                group["lr"] = lrs[step]
            index = order[start:end]
            loss = F.cross_entropy(model(data.train_x[index]), data.train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            # Smooth and record (a host sync per step: the test needs each loss)
            value = float(loss.item())
            if not math.isfinite(value):
                logger.info("range test: loss is %s at lr %.3g; stopping", value, lrs[step])
                return RangeTestResult(recorded_lrs, smoothed, diverged=True)
            average = value if step == 0 else (
                test.smoothing * value + (1 - test.smoothing) * average)
            recorded_lrs.append(lrs[step])
            smoothed.append(average)
            best = min(best, average)
            step += 1
            if average > test.divergence_factor * best:
                logger.info("range test: smoothed loss %.3g is over %.1fx its best at lr %.3g; "
                            "stopping", average, test.divergence_factor, lrs[step - 1])
                return RangeTestResult(recorded_lrs, smoothed, diverged=True)
    return RangeTestResult(recorded_lrs, smoothed, diverged=False)
