"""The optimizer and the `CyclicLR` of one trial, built from its spec and parameters.

| call                                            | gives                        |
|-------------------------------------------------|------------------------------|
| `build_optimizer(model.parameters(), spec, lr)` | SGD or AdamW                 |
| `build_scheduler(optimizer, params, batches)`   | `torch`'s own `CyclicLR`     |
| `momentum_of(optimizer)`                        | SGD momentum or AdamW beta1  |

The scheduler is torch's `CyclicLR` itself, so the LR applied at each step is exactly
what torch gives for the trial's parameters. Two things are added around it:

- `scale_mode` is a real knob. Torch forces `cycle` for `triangular` and `triangular2`
  and `iterations` for `exp_range`, and honours `scale_mode` only with a custom
  `scale_fn`; so when a trial sets `scale_mode`, the mode's own scale function is
  passed explicitly. It is a module-level callable object, not a lambda, because
  `CyclicLR.state_dict` keeps a callable object's `__dict__` but drops a function.
- Cycling momentum on SGD without momentum is refused: `CyclicLR` would silently turn
  momentum on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import CyclicLR

from clrsearch.spec import CyclicParams, Mode, OptimizerSpec

logger = logging.getLogger(__name__)

# AdamW's second-moment decay; only beta1 is tied to the spec's momentum.
ADAMW_BETA2 = 0.999


def build_optimizer(
    model_params: Iterable[Any], spec: OptimizerSpec, lr: float
) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, weight decay) or AdamW (weight decay) at learning rate `lr`.

    For AdamW the spec's `momentum` is beta1, the quantity `CyclicLR` cycles for Adam;
    the default 0.9 is AdamW's own default.
    """
    if spec.name == "sgd":
        return torch.optim.SGD(
            model_params,
            lr=lr,
            momentum=spec.momentum,
            nesterov=spec.nesterov,
            weight_decay=spec.weight_decay,
        )
    if spec.name == "adamw":
        return torch.optim.AdamW(
            model_params,
            lr=lr,
            betas=(spec.momentum, ADAMW_BETA2),
            weight_decay=spec.weight_decay,
        )
    raise ValueError(f"unknown optimizer {spec.name!r}; choose sgd or adamw")


class TriangularScale:
    """`triangular`'s scale: the full height in every cycle."""

    def __call__(self, x: float) -> float:
        return 1.0


class Triangular2Scale:
    """`triangular2`'s scale, `1 / 2 ** (x - 1)`: the height halves with each unit of x."""

    def __call__(self, x: float) -> float:
        # The same expression as torch's own, so that with scale_mode "cycle" the
        # schedule is bit-for-bit torch's built-in triangular2.
        return 1 / (2.0 ** (x - 1))


class ExpRangeScale:
    """`exp_range`'s scale, `gamma ** x`. `gamma` is an attribute so that it is saved."""

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma

    def __call__(self, x: float) -> float:
        return self.gamma**x


def scale_function(mode: Mode, gamma: float) -> TriangularScale | Triangular2Scale | ExpRangeScale:
    """The scale function of `mode`, as a picklable callable object."""
    if mode == "triangular":
        return TriangularScale()
    if mode == "triangular2":
        return Triangular2Scale()
    if mode == "exp_range":
        return ExpRangeScale(gamma)
    raise ValueError(f"unknown mode {mode!r}; choose triangular, triangular2 or exp_range")


def build_scheduler(
    optimizer: torch.optim.Optimizer, params: CyclicParams, batches_per_epoch: int
) -> CyclicLR:
    """Torch's `CyclicLR` for `params`, with step sizes in optimizer steps.

    Construction sets the optimizer's LR to the schedule's first value (`base_lr`) and,
    with `cycle_momentum`, its momentum (or beta1) to `max_momentum`. Step the
    scheduler once after every optimizer step.
    """
    if batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch must be at least 1, got {batches_per_epoch}")
    if params.cycle_momentum and optimizer.defaults.get("momentum", None) == 0:
        raise ValueError(
            "cycle_momentum is on but the SGD optimizer has momentum 0: CyclicLR would "
            "silently turn momentum on. Set cycle_momentum to false or give the optimizer "
            "a momentum"
        )

    step_size_up, step_size_down = params.iterations_for(batches_per_epoch)
    # scale_mode None keeps torch's built-in behaviour for the mode; a given scale_mode
    # only takes effect through an explicit scale_fn (torch ignores it otherwise).
    scale_fn = None
    scale_mode = "cycle"
    if params.scale_mode is not None:
        scale_fn = scale_function(params.mode, params.gamma)
        scale_mode = params.scale_mode

    logger.debug(
        "CyclicLR %s from %g to %g, %d steps up and %d down (%d batches per epoch), scale_mode %s",
        params.mode,
        params.base_lr,
        params.max_lr,
        step_size_up,
        step_size_down,
        batches_per_epoch,
        params.scale_mode or "built in",
    )
    return CyclicLR(
        optimizer,
        base_lr=params.base_lr,
        max_lr=params.max_lr,
        step_size_up=step_size_up,
        step_size_down=step_size_down,
        mode=params.mode,
        gamma=params.gamma,
        scale_fn=scale_fn,
        scale_mode=scale_mode,
        cycle_momentum=params.cycle_momentum,
        base_momentum=params.base_momentum,
        max_momentum=params.max_momentum,
    )


def momentum_of(optimizer: torch.optim.Optimizer) -> float:
    """The momentum of the first parameter group: SGD's `momentum` or Adam's beta1."""
    group = optimizer.param_groups[0]
    if "momentum" in group:
        return float(group["momentum"])
    if "betas" in group:
        return float(group["betas"][0])
    raise ValueError(f"optimizer {type(optimizer).__name__} has neither momentum nor betas")
