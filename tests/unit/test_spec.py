"""The study spec: defaults, refusals with their messages, and the max_lr > base_lr rule."""

from __future__ import annotations

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from clrsearch.spec import CyclicParams, CyclicSpace, StudySpec, searched_params
from service.optuna_bridge import suggest_params


def test_a_name_alone_is_a_complete_study() -> None:
    spec = StudySpec(name="x")

    assert spec.task.dataset == "digits"
    assert spec.objective == "val_loss"
    assert spec.sampler == "tpe"
    assert searched_params(spec.space) == {
        "max_lr": "float", "lr_ratio": "float", "step_size_up": "float"
    }


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"base_lr": 0.2, "max_lr": 0.1}, "highest base_lr (0.2) is not below the lowest max_lr"),
        ({"base_lr": {"low": 0.01, "high": 0.2}, "max_lr": {"low": 0.1, "high": 1.0}},
         "base_lr must stay below max_lr for every trial"),
        ({"lr_ratio": 1.0}, "lr_ratio must be above 1"),
        ({"base_lr": 0.01, "lr_ratio": 3.0}, "either base_lr or lr_ratio"),
        ({"max_lr": {"low": 0.5, "high": 0.1}}, "low must be below high"),
        ({"max_lr": {"low": 0.0, "high": 0.1, "log": True}}, "a log range needs low > 0"),
        ({"step_size_up": 0.5, "step_size_unit": "iterations"}, "at least 1 iteration"),
        ({"step_size_down": 0}, "step_size_down must be positive"),
        ({"mode": "exp_range", "gamma": 1.5}, "gamma must lie in (0, 1]"),
        ({"mode": "triangular", "gamma": 0.99}, "gamma only applies to mode exp_range"),
        ({"base_momentum": 0.95, "max_momentum": 0.9}, "base_momentum must not exceed"),
        ({"mode": ["triangular", "triangular"]}, "choices must be distinct"),
        ({"mode": "sawtooth"}, "triangular"),
        ({"cycle": 2}, "Extra inputs are not permitted"),
    ],
)
def test_impossible_space_is_refused_with_a_message_naming_the_problem(space, message) -> None:
    with pytest.raises(ValidationError) as raised:
        StudySpec.model_validate({"name": "x", "space": space})

    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"task": {"optimizer": {"momentum": 0.0}}}, "CyclicLR would silently turn momentum on"),
        ({"task": {"dataset": "imagefolder"}}, "needs data_path"),
        ({"task": {"model": "resnet1000"}}, "unknown model 'resnet1000'"),
        ({"sampler": "cmaes", "space": {"mode": ["triangular", "triangular2"]}},
         "cmaes cannot search choices (mode)"),
        ({"sampler": "qmc", "space": {"mode": ["triangular", "exp_range"]}},
         "conditional space"),
        ({"enqueue": [{"base_lr": 0.1}]}, "enqueue[0] names base_lr"),
        ({"pruner": "sometimes"}, "hyperband"),
        ({"parallelism": 0}, "greater than or equal to 1"),
    ],
)
def test_impossible_study_is_refused_with_a_message(spec, message) -> None:
    with pytest.raises(ValidationError) as raised:
        StudySpec.model_validate({"name": "x", **spec})

    assert message in str(raised.value)


def test_precision_defaults_to_auto_and_takes_float32_or_bfloat16() -> None:
    assert StudySpec(name="x").task.precision == "auto"
    for precision in ("auto", "float32", "bfloat16"):
        spec = StudySpec.model_validate({"name": "x", "task": {"precision": precision}})
        assert spec.task.precision == precision


def test_unknown_precision_is_refused_naming_the_field_and_the_choices() -> None:
    with pytest.raises(ValidationError) as raised:
        StudySpec.model_validate({"name": "x", "task": {"precision": "float16"}})

    assert "task.precision" in str(raised.value)
    assert "'auto', 'float32' or 'bfloat16'" in str(raised.value)


def test_exp_range_gets_a_gamma_range_and_other_modes_keep_none() -> None:
    assert CyclicSpace(mode="exp_range").gamma is not None
    assert CyclicSpace(mode="triangular").gamma is None


def test_momentum_off_with_cycle_momentum_off_is_accepted() -> None:
    spec = StudySpec.model_validate({
        "name": "x", "task": {"optimizer": {"momentum": 0}}, "space": {"cycle_momentum": False}
    })

    assert spec.space.cycle_momentum is False


def test_step_sizes_convert_from_epochs_with_the_real_batch_count() -> None:
    params = CyclicParams(base_lr=0.01, max_lr=0.1, step_size_up=2.5, step_size_down=0.01)

    assert params.iterations_for(batches_per_epoch=45) == (112, 1)


positive = st.floats(min_value=1e-6, max_value=10.0, allow_nan=False)


@st.composite
def spaces(draw) -> dict:
    max_low = draw(positive)
    max_high = max_low * draw(st.floats(min_value=1.001, max_value=100.0))
    space: dict = {"max_lr": {"low": max_low, "high": max_high, "log": draw(st.booleans())}}
    if draw(st.booleans()):
        ratio_low = draw(st.floats(min_value=1.0001, max_value=20.0))
        space["lr_ratio"] = draw(st.one_of(
            st.just(ratio_low),
            st.just({"low": ratio_low, "high": ratio_low * 2, "log": True}),
        ))
    else:
        base_high = max_low * draw(st.floats(min_value=0.01, max_value=0.999))
        space["lr_ratio"] = None
        space["base_lr"] = draw(st.one_of(
            st.just(base_high),
            st.just({"low": base_high / 10, "high": base_high, "log": True}),
        ))
    space["mode"] = draw(st.sampled_from(
        ["triangular", ["triangular", "exp_range"], ["triangular2", "exp_range"]]
    ))
    return space


@settings(max_examples=60, deadline=None)
@given(space=spaces(), seed=st.integers(0, 2**16))
def test_no_sampled_trial_ever_has_max_lr_at_or_below_base_lr(space, seed) -> None:
    spec = StudySpec.model_validate({"name": "x", "space": space, "sampler": "random"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))

    for _ in range(20):
        params = suggest_params(study.ask(), spec.space)
        assert params.max_lr > params.base_lr
        assert params.mode != "exp_range" or 0 < params.gamma <= 1


@settings(max_examples=60, deadline=None)
@given(base=positive, below=st.floats(min_value=0.0, max_value=1.0))
def test_any_fixed_max_lr_not_above_base_lr_is_refused(base, below) -> None:
    with pytest.raises(ValidationError):
        StudySpec.model_validate(
            {"name": "x", "space": {"base_lr": base, "max_lr": base * below}}
        )
