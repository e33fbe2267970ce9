"""Where the cycles of a CyclicLR schedule end, from iteration counts alone.

A cycle of `step_size_up + step_size_down` iterations starts and ends at `base_lr`
(times the mode's scale), the point where Smith recommends stopping and where losses of
different trials can be compared fairly. Evaluations happen at epoch ends, so an epoch
end counts as a cycle end when a cycle finished during that epoch and the LR has not yet
climbed far into the next one.
"""

from __future__ import annotations

from clrsearch.spec import CyclicParams

# An epoch end up to this fraction of a cycle past the cycle's end still counts: the LR
# there is within half of that fraction of the way from base_lr to max_lr (when up and
# down are equal), close enough to the trough to compare.
CYCLE_END_TOLERANCE = 0.25


def cycle_length(params: CyclicParams, batches_per_epoch: int) -> int:
    up, down = params.iterations_for(batches_per_epoch)
    return up + down


def is_cycle_end(iterations_before: int, iterations_after: int, length: int) -> bool:
    """True when a cycle ended in (iterations_before, iterations_after] close to its end."""
    cycles_finished = iterations_after // length
    if cycles_finished == iterations_before // length or cycles_finished == 0:
        return False
    return (iterations_after - cycles_finished * length) <= CYCLE_END_TOLERANCE * length


def cycle_end_epochs(params: CyclicParams, batches_per_epoch: int, epochs: int) -> list[int]:
    """The epochs (1-based) whose ends count as cycle ends for these parameters."""
    length = cycle_length(params, batches_per_epoch)
    return [
        epoch for epoch in range(1, epochs + 1)
        if is_cycle_end((epoch - 1) * batches_per_epoch, epoch * batches_per_epoch, length)
    ]
