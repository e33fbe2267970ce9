"""Cycle-end detection agrees with where torch's CyclicLR returns to its low point."""

from __future__ import annotations

import pytest
import torch

from clrsearch.cycles import cycle_end_epochs, is_cycle_end
from clrsearch.spec import CyclicParams


def torch_lrs(params: CyclicParams, batches_per_epoch: int, epochs: int) -> list[float]:
    up, down = params.iterations_for(batches_per_epoch)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=params.base_lr,
                                momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CyclicLR(
        optimizer, params.base_lr, params.max_lr, step_size_up=up, step_size_down=down,
        mode=params.mode, gamma=params.gamma,
    )
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(batches_per_epoch * epochs):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs  # lrs[t] is the LR after t iterations


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
@pytest.mark.parametrize(("up", "down"), [(2, 2), (1, 3), (3, 1)])
def test_detected_cycle_ends_are_where_the_lr_is_back_at_base_lr(mode, up, down) -> None:
    params = CyclicParams(base_lr=0.01, max_lr=0.1, step_size_up=up, step_size_down=down,
                          mode=mode, gamma=0.999)
    lrs = torch_lrs(params, batches_per_epoch=10, epochs=12)

    ends = cycle_end_epochs(params, batches_per_epoch=10, epochs=12)

    assert ends == [4, 8, 12]
    for epoch in ends:
        assert lrs[epoch * 10] == pytest.approx(0.01, abs=1e-12)
    others = [lrs[epoch * 10] for epoch in range(1, 13) if epoch not in ends]
    assert all(lr > 0.01 + 1e-9 for lr in others)


def test_an_epoch_end_just_past_a_cycle_end_counts_and_one_far_past_does_not() -> None:
    # A cycle of 100 iterations: 110 is 10% into the next cycle, 160 is 60% in.
    assert is_cycle_end(60, 110, 100)
    assert not is_cycle_end(60, 160, 100)
    assert not is_cycle_end(10, 60, 100)  # no cycle finished yet


def test_cycles_shorter_than_an_epoch_make_every_epoch_a_cycle_end_at_its_trough() -> None:
    params = CyclicParams(base_lr=0.01, max_lr=0.1, step_size_up=2, step_size_down=3,
                          step_size_unit="iterations")

    assert cycle_end_epochs(params, batches_per_epoch=10, epochs=3) == [1, 2, 3]


def test_fractional_epoch_step_sizes_snap_to_the_nearest_epoch_after_the_cycle() -> None:
    # 2.2 + 2.2 epochs of 10 iterations: cycles end at 44, 88, 132 iterations.
    params = CyclicParams(base_lr=0.01, max_lr=0.1, step_size_up=2.2)

    assert cycle_end_epochs(params, batches_per_epoch=10, epochs=14) == [5, 9, 14]
