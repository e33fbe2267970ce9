"""LR bounds from a range test's curve (Smith, section 3.3), and the space around them.

Pure Python: the server derives the bounds from the curve a worker measured.

- `max_lr` is where the smoothed loss stops improving: the first LR at which the loss
  has made 90% of its whole fall, capped at a quarter of the LR of the loss minimum.
  The cap is there because a fast ramp reaches its loss minimum past the largest LR that
  trains stably (seen in the digits pilot of the project's notes: taking the minimum
  itself diverged, a quarter of it worked).
- `base_lr` is where the loss starts improving: the first LR at which 10% of the fall
  is made, kept between a tenth and a third of `max_lr` (Smith's rule of thumb puts it
  at a third or a quarter).
"""

from __future__ import annotations

from dataclasses import dataclass

from clrsearch.spec import CyclicSpace, FloatRange

IMPROVEMENT_STARTS = 0.10
IMPROVEMENT_ENDS = 0.90
MINIMUM_CAP = 4.0


@dataclass(frozen=True)
class SuggestedBounds:
    base_lr: float
    max_lr: float
    loss_minimum_lr: float


class CurveTooFlat(ValueError):
    """Raised when the loss never fell during the range test, so no bound can be read."""


def suggest_bounds(lrs: list[float], losses: list[float]) -> SuggestedBounds:
    if len(lrs) != len(losses) or len(lrs) < 3:
        raise ValueError(
            f"a range test needs matching lists of at least 3 LRs and losses, got "
            f"{len(lrs)} and {len(losses)}"
        )
    lowest = min(range(len(losses)), key=losses.__getitem__)
    start = losses[0]
    fall = start - losses[lowest]
    if lowest == 0 or fall <= 1e-9 * max(1.0, abs(start)):
        raise CurveTooFlat(
            f"the loss never fell between LR {lrs[0]:.3g} and {lrs[-1]:.3g}; widen the "
            "range test (start_lr, end_lr) or train longer (epochs)"
        )

    def first_reaching(fraction: float) -> int:
        target = start - fraction * fall
        return next(i for i in range(lowest + 1) if losses[i] <= target)

    max_lr = min(lrs[first_reaching(IMPROVEMENT_ENDS)], lrs[lowest] / MINIMUM_CAP)
    base_lr = min(max(lrs[first_reaching(IMPROVEMENT_STARTS)], max_lr / 10), max_lr / 3)
    return SuggestedBounds(base_lr=base_lr, max_lr=max_lr, loss_minimum_lr=lrs[lowest])


def space_around(space: CyclicSpace, bounds: SuggestedBounds) -> CyclicSpace:
    """The space with max_lr searched within 2x of the suggestion, and lr_ratio around
    the suggested ratio: every trial still has max_lr > base_lr."""
    ratio = bounds.max_lr / bounds.base_lr
    return space.model_copy(update={
        "max_lr": FloatRange(low=bounds.max_lr / 2, high=bounds.max_lr * 2, log=True),
        "base_lr": None,
        "lr_ratio": FloatRange(low=max(1.5, ratio / 2), high=max(3.0, ratio * 2), log=True),
    })
