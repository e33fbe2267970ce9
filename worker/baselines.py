"""Schedules of baseline runs: what a CyclicLR trial is compared against.

Each is torch's own scheduler, stepped once per optimizer step like CyclicLR, so the
comparison differs in the schedule alone.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LambdaLR,
    LRScheduler,
    MultiStepLR,
    OneCycleLR,
)

from clrsearch.spec import BaselineParams

# Step decay divides the LR by ten at half and at three quarters of training, the
# schedule of the ResNet and many CIFAR recipes.
STEP_DECAY_POINTS = (0.5, 0.75)
STEP_DECAY_FACTOR = 0.1


class _Constant:
    """A picklable constant multiplier (a lambda would be dropped from state_dict)."""

    def __call__(self, _step: int) -> float:
        return 1.0


def build_baseline_scheduler(
    optimizer: torch.optim.Optimizer, params: BaselineParams, total_steps: int
) -> LRScheduler:
    """The baseline's scheduler; it sets the optimizer's LR to its first value."""
    for group in optimizer.param_groups:
        group["lr"] = params.lr
        group["initial_lr"] = params.lr
    if params.schedule == "fixed":
        return LambdaLR(optimizer, _Constant())
    if params.schedule == "step":
        milestones = sorted({max(1, round(total_steps * point)) for point in STEP_DECAY_POINTS})
        return MultiStepLR(optimizer, milestones=milestones, gamma=STEP_DECAY_FACTOR)
    if params.schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    if params.schedule == "onecycle":
        return OneCycleLR(optimizer, max_lr=params.lr, total_steps=max(2, total_steps))
    raise ValueError(f"unknown baseline schedule {params.schedule!r}")
