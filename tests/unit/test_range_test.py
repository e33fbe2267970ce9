"""The LR range test: the ramp, bounds on a problem with a known stable range, and the
comparison with torch-lr-finder on the same model and data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clrsearch.lr_bounds import suggest_bounds
from clrsearch.spec import RangeTestSpec, TaskSpec
from worker.data import DatasetCache
from worker.models import build_model
from worker.range_test import ramp, run_range_test
from worker.schedule import build_optimizer


def test_exponential_ramp_gives_each_decade_the_same_number_of_steps() -> None:
    lrs = ramp(RangeTestSpec(start_lr=1e-4, end_lr=1.0), 41)

    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1.0)
    assert [lrs[i] for i in (10, 20, 30)] == pytest.approx([1e-3, 1e-2, 1e-1])


def test_linear_ramp_rises_in_equal_steps() -> None:
    lrs = ramp(RangeTestSpec(start_lr=0.1, end_lr=1.0, ramp="linear"), 10)

    assert np.diff(lrs) == pytest.approx([0.1] * 9)


def quadratic_range_test(curvature: float, test: RangeTestSpec, steps: int) -> tuple:
    """Gradient descent on f(w) = curvature * w**2 / 2 under the ramp: it converges for
    lr < 2 / curvature and diverges above, so the stable range is known exactly."""
    weight, average, best = 1.0, math.inf, math.inf
    lrs, losses = [], []
    for step, lr in enumerate(ramp(test, steps)):
        weight -= lr * curvature * weight
        loss = curvature * weight**2 / 2
        average = loss if step == 0 else test.smoothing * loss + (1 - test.smoothing) * average
        lrs.append(lr)
        losses.append(average)
        best = min(best, average)
        if average > test.divergence_factor * best:
            break
    return lrs, losses


@pytest.mark.parametrize("curvature", [0.5, 4.0, 40.0])
def test_suggested_bounds_lie_inside_the_known_stable_range(curvature: float) -> None:
    stable_limit = 2 / curvature
    lrs, losses = quadratic_range_test(curvature, RangeTestSpec(start_lr=1e-5, end_lr=100),
                                       steps=200)

    bounds = suggest_bounds(lrs, losses)

    assert bounds.max_lr < stable_limit
    assert bounds.max_lr > stable_limit / 100
    assert bounds.base_lr < bounds.max_lr


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    task = TaskSpec(model="mlp")
    return task, DatasetCache(tmp_path_factory.mktemp("data")).get(task)


def test_range_test_on_digits_stops_once_the_loss_diverges(digits) -> None:
    task, data = digits
    result = run_range_test(RangeTestSpec(), task, data, torch.device("cpu"))

    assert result.diverged
    assert len(result.lrs) == len(result.losses) < 2 * 45
    assert result.losses[-1] > 4 * min(result.losses)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore:.*tqdm.*")
def test_suggested_max_lr_is_close_to_torch_lr_finders_suggestion(digits) -> None:
    from torch.utils.data import DataLoader, TensorDataset
    from torch_lr_finder import LRFinder

    task, data = digits
    test = RangeTestSpec()
    ours = run_range_test(test, task, data, torch.device("cpu"))

    torch.manual_seed(task.seed)
    model = build_model(task.model, data.in_channels, data.image_size, data.num_classes)
    optimizer = build_optimizer(model.parameters(), task.optimizer, lr=test.start_lr)
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=task.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(task.seed))
    finder = LRFinder(model, optimizer, torch.nn.CrossEntropyLoss(), device="cpu")
    finder.range_test(loader, end_lr=test.end_lr, num_iter=len(ours.lrs) + 10,
                      step_mode="exp", smooth_f=test.smoothing,
                      diverge_th=test.divergence_factor)
    # torch-lr-finder suggests the LR of the steepest fall, skipping the first 10 and last
    # 5 points as its plot does.
    lrs, losses = finder.history["lr"][10:-5], finder.history["loss"][10:-5]
    theirs = lrs[int(np.gradient(np.array(losses)).argmin())]

    suggested = suggest_bounds(ours.lrs, ours.losses)

    # We read max_lr where the fall ends, so at or past the steepest point, but not far.
    assert theirs / 2 <= suggested.max_lr <= theirs * 4, (suggested, theirs)
