"""Bounds read off a range-test curve."""

from __future__ import annotations

import math

import pytest

from clrsearch.lr_bounds import CurveTooFlat, space_around, suggest_bounds
from clrsearch.spec import CyclicSpace


def test_bounds_sit_between_where_the_loss_starts_falling_and_its_minimum() -> None:
    lrs = [1e-4 * 10 ** (i / 10) for i in range(41)]  # 1e-4 .. 1

    def loss(lr: float) -> float:
        # Flat at 2.0 up to 1e-3, falling linearly in log(lr) to 0.2 at 0.1, then exploding.
        if lr < 1e-3:
            return 2.0
        if lr <= 0.1:
            return 2.0 - 0.9 * (math.log10(lr) + 3)
        return 0.2 + 20 * (lr - 0.1)

    losses = [loss(lr) for lr in lrs]

    bounds = suggest_bounds(lrs, losses)

    assert bounds.loss_minimum_lr == pytest.approx(0.1, rel=0.3)
    assert bounds.max_lr <= bounds.loss_minimum_lr / 4
    assert bounds.max_lr / 10 <= bounds.base_lr <= bounds.max_lr / 3
    assert 1e-3 <= bounds.base_lr


def test_a_curve_that_never_falls_is_refused_with_advice() -> None:
    with pytest.raises(CurveTooFlat, match="widen the range test"):
        suggest_bounds([1e-5, 1e-4, 1e-3], [1.0, 1.1, 1.2])


def test_the_space_around_the_bounds_keeps_max_lr_above_base_lr() -> None:
    bounds = suggest_bounds([1e-3, 1e-2, 1e-1, 1.0], [2.0, 1.0, 0.3, 5.0])

    space = space_around(CyclicSpace(), bounds)

    assert space.base_lr is None
    assert space.lr_ratio.low > 1  # type: ignore[union-attr]
    assert space.max_lr.low == bounds.max_lr / 2  # type: ignore[union-attr]
