"""The optimizer and CyclicLR built for a trial against torch's CyclicLR used by hand."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clrsearch.spec import CyclicParams, OptimizerSpec
from tests.reference import torch_cyclic_reference
from worker.schedule import build_optimizer, build_scheduler, momentum_of

MODES = ("triangular", "triangular2", "exp_range")
SCALE_MODES = (None, "cycle", "iterations")
GAMMA = 0.9


def reference_scale_fn(mode: str, gamma: float):
    """The modes' scale functions as written in CYCLICLR.md, as plain lambdas."""
    return {
        "triangular": lambda x: 1.0,
        "triangular2": lambda x: 1 / (2.0 ** (x - 1)),
        "exp_range": lambda x: gamma**x,
    }[mode]


def built_schedule(optimizer_name: str, params: CyclicParams, batches_per_epoch: int, steps: int):
    """The same, through build_optimizer and build_scheduler."""
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([weight], OptimizerSpec(name=optimizer_name), lr=params.base_lr)
    scheduler = build_scheduler(optimizer, params, batches_per_epoch)
    lrs, momentums = [], []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        momentums.append(momentum_of(optimizer))
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        scheduler.step()
    return lrs, momentums


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("cycle_momentum", [True, False])
@pytest.mark.parametrize("scale_mode", SCALE_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_built_scheduler_matches_torch_cyclic_lr_step_by_step(
    mode, scale_mode, cycle_momentum, optimizer_name
):
    # 5 batches per epoch: 1.4 epochs up is 7 steps, 0.6 down is 3.
    params = CyclicParams(
        base_lr=0.01,
        max_lr=0.1,
        step_size_up=1.4,
        step_size_down=0.6,
        mode=mode,
        gamma=GAMMA,
        scale_mode=scale_mode,
        cycle_momentum=cycle_momentum,
    )
    custom = {}
    if scale_mode is not None:
        custom = {"scale_fn": reference_scale_fn(mode, GAMMA), "scale_mode": scale_mode}
    expected = torch_cyclic_reference(
        optimizer_name,
        35,
        base_lr=0.01,
        max_lr=0.1,
        step_size_up=7,
        step_size_down=3,
        mode=mode,
        gamma=GAMMA,
        cycle_momentum=cycle_momentum,
        base_momentum=0.85,
        max_momentum=0.95,
        **custom,
    )

    assert built_schedule(optimizer_name, params, 5, 35) == expected


def test_lr_and_momentum_follow_the_closed_form_formula():
    up, down, base, top, gamma = 4, 6, 0.02, 0.2, 0.95
    params = CyclicParams(
        base_lr=base,
        max_lr=top,
        step_size_up=up,
        step_size_down=down,
        step_size_unit="iterations",
        mode="exp_range",
        gamma=gamma,
    )
    lrs, momentums = built_schedule("sgd", params, 7, 30)

    total = up + down
    for t in range(30):
        cycle = math.floor(1 + t / total)
        x = 1 + t / total - cycle
        factor = x / (up / total) if x <= up / total else (x - 1) / (up / total - 1)
        scale = gamma**t
        assert lrs[t] == pytest.approx(base + (top - base) * factor * scale, rel=0, abs=1e-12)
        assert momentums[t] == pytest.approx(0.95 - 0.1 * factor * scale, rel=0, abs=1e-12)


def test_scale_mode_iterations_changes_the_triangular2_schedule():
    def schedule(scale_mode):
        params = CyclicParams(
            base_lr=0.01,
            max_lr=0.1,
            step_size_up=3,
            step_size_unit="iterations",
            mode="triangular2",
            scale_mode=scale_mode,
        )
        return built_schedule("sgd", params, 10, 20)[0]

    built_in, by_cycle, by_iteration = schedule(None), schedule("cycle"), schedule("iterations")

    # "cycle" is what torch does for triangular2 anyway; "iterations" halves the height
    # with every step, so the LR barely leaves base_lr after the first steps.
    assert by_cycle == built_in
    assert by_iteration != by_cycle
    assert max(by_iteration[6:]) < 0.011


def test_scale_mode_cycle_changes_the_exp_range_schedule():
    def schedule(scale_mode):
        params = CyclicParams(
            base_lr=0.01,
            max_lr=0.1,
            step_size_up=3,
            step_size_unit="iterations",
            mode="exp_range",
            gamma=0.8,
            scale_mode=scale_mode,
        )
        return built_schedule("sgd", params, 10, 20)[0]

    assert schedule("iterations") == schedule(None)
    assert schedule("cycle") != schedule(None)


def _stepped(scheduler, optimizer, steps):
    lrs = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def _fresh(params):
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([weight], OptimizerSpec(), lr=params.base_lr)
    return build_scheduler(optimizer, params, 4), optimizer


@pytest.mark.parametrize("mode", MODES)
def test_scheduler_with_scale_mode_resumes_from_its_state_dict(mode):
    params = CyclicParams(
        base_lr=0.01,
        max_lr=0.1,
        step_size_up=1.5,
        mode=mode,
        gamma=GAMMA,
        scale_mode="cycle",
    )
    uninterrupted, optimizer = _fresh(params)
    _stepped(uninterrupted, optimizer, 9)
    checkpoint = io.BytesIO()
    torch.save(uninterrupted.state_dict(), checkpoint)
    expected = _stepped(uninterrupted, optimizer, 25)

    resumed, resumed_optimizer = _fresh(params)
    checkpoint.seek(0)
    resumed.load_state_dict(torch.load(checkpoint))

    assert _stepped(resumed, resumed_optimizer, 25) == expected


def test_checkpoint_carries_the_scale_functions_gamma():
    saved_params = CyclicParams(
        base_lr=0.01, max_lr=0.1, step_size_up=2, mode="exp_range", gamma=0.7, scale_mode="cycle"
    )
    original, optimizer = _fresh(saved_params)
    _stepped(original, optimizer, 5)
    state = original.state_dict()
    expected = _stepped(original, optimizer, 20)

    # Built with another gamma: the loaded state must win, as a lambda's would not.
    other, other_optimizer = _fresh(saved_params.model_copy(update={"gamma": 0.99}))
    other.load_state_dict(state)

    assert _stepped(other, other_optimizer, 20) == expected


def test_cycling_momentum_on_sgd_without_momentum_is_refused():
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([weight], OptimizerSpec(momentum=0.0), lr=0.01)
    params = CyclicParams(base_lr=0.01, max_lr=0.1, step_size_up=1)

    with pytest.raises(ValueError, match="momentum 0"):
        build_scheduler(optimizer, params, 10)
    build_scheduler(optimizer, params.model_copy(update={"cycle_momentum": False}), 10)


def test_sgd_settings_reach_the_optimizer():
    weight = torch.nn.Parameter(torch.zeros(2))
    spec = OptimizerSpec(momentum=0.8, weight_decay=0.01, nesterov=True)
    optimizer = build_optimizer([weight], spec, lr=0.05)

    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.8, 0.01)
    assert group["nesterov"] is True
    assert momentum_of(optimizer) == 0.8


def test_adamw_uses_momentum_as_beta1():
    weight = torch.nn.Parameter(torch.zeros(2))
    spec = OptimizerSpec(name="adamw", momentum=0.85, weight_decay=0.02)
    optimizer = build_optimizer([weight], spec, lr=0.001)

    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["weight_decay"] == 0.02
    assert momentum_of(optimizer) == 0.85


def test_nesterov_without_momentum_is_refused_when_the_spec_is_built():
    with pytest.raises(ValueError, match="nesterov needs the sgd optimizer with a momentum"):
        OptimizerSpec(momentum=0.0, nesterov=True)


def test_momentum_of_an_optimizer_without_momentum_names_it():
    optimizer = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(2))], lr=0.01)
    with pytest.raises(ValueError, match="Adagrad"):
        momentum_of(optimizer)


@settings(max_examples=40, deadline=None)
@given(
    max_lr=st.floats(1e-4, 1.0),
    ratio=st.floats(1.5, 20.0),
    up=st.integers(1, 12),
    down=st.integers(1, 12),
    mode=st.sampled_from(MODES),
    gamma=st.floats(0.5, 1.0),
)
def test_any_iteration_params_give_torchs_schedule(max_lr, ratio, up, down, mode, gamma):
    params = CyclicParams(
        base_lr=max_lr / ratio,
        max_lr=max_lr,
        step_size_up=up,
        step_size_down=down,
        step_size_unit="iterations",
        mode=mode,
        gamma=gamma,
    )
    expected = torch_cyclic_reference(
        "sgd",
        60,
        base_lr=max_lr / ratio,
        max_lr=max_lr,
        step_size_up=up,
        step_size_down=down,
        mode=mode,
        gamma=gamma,
        base_momentum=0.85,
        max_momentum=0.95,
    )

    assert built_schedule("sgd", params, 3, 60) == expected
