"""Schedule previews: the LR and momentum a trial will run at each optimizer step.

The preview is computed by the workers' own code (`worker.schedule`, which builds
torch's `CyclicLR`) on a one-parameter model, so it equals what a worker applies to
float precision by construction, not by a second implementation of the formula.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from clrsearch.spec import CyclicParams, TaskSpec
from service.errors import InvalidRequest

# Training-set sizes before the validation split; the worker splits the same way.
DATASET_SIZES = {"digits": 1797, "mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000}
MAX_PREVIEW_STEPS = 2_000_000


class PreviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    params: CyclicParams
    task: TaskSpec = TaskSpec()
    # Needed for imagefolder data, whose size only the workers know.
    batches_per_epoch: int | None = Field(None, ge=1, le=10_000_000)
    max_points: int = Field(2000, ge=2, le=100_000)


class SchedulePreview(BaseModel):
    batches_per_epoch: int
    total_steps: int
    step_size_up: int
    step_size_down: int
    iterations: list[int]
    lr: list[float]
    momentum: list[float]


def batches_per_epoch(task: TaskSpec) -> int:
    size = task.fake_size if task.dataset == "fake" else DATASET_SIZES.get(task.dataset)
    if size is None:
        raise InvalidRequest(
            f"the size of dataset {task.dataset!r} is known only to the workers; "
            "give batches_per_epoch"
        )
    validation = min(max(1, round(size * task.val_fraction)), size - 1)
    return math.ceil((size - validation) / task.batch_size)


def preview_schedule(request: PreviewRequest) -> SchedulePreview:
    # torch is imported here: the rest of the server does not need it.
    import torch

    from service.domain import thin_indices
    from worker.schedule import build_optimizer, build_scheduler, momentum_of

    batches = request.batches_per_epoch or batches_per_epoch(request.task)
    total = batches * request.task.epochs
    if total > MAX_PREVIEW_STEPS:
        raise InvalidRequest(
            f"a preview of {total} steps is over the {MAX_PREVIEW_STEPS}-step limit; "
            "preview fewer epochs"
        )
    weight = torch.nn.Parameter(torch.zeros(1))
    try:
        optimizer = build_optimizer([weight], request.task.optimizer, lr=request.params.base_lr)
        scheduler = build_scheduler(optimizer, request.params, batches)
    except ValueError as error:
        raise InvalidRequest(str(error)) from error
    keep = thin_indices(total, request.max_points)
    wanted = set(keep)
    lrs, momentums = [], []
    for step in range(total):
        if step in wanted:
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            momentums.append(momentum_of(optimizer))
        # No gradient: the optimizer step changes nothing, but CyclicLR expects one
        # before each scheduler step.
        optimizer.step()
        scheduler.step()
    up, down = request.params.iterations_for(batches)
    return SchedulePreview(
        batches_per_epoch=batches, total_steps=total, step_size_up=up, step_size_down=down,
        iterations=keep, lr=lrs, momentum=momentums,
    )
