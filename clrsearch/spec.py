"""The study spec: what a person submits, and the concrete settings one trial runs with.

This module is shared by the server and the workers, so it imports only pydantic and
the standard library. The server validates a submitted `StudySpec`, turns its search
space into Optuna distributions and hands each trial a `CyclicParams`; the worker turns
`CyclicParams` into a `torch.optim.lr_scheduler.CyclicLR`.

How the space rules out `max_lr <= base_lr`: either `base_lr` is derived from a
searched or fixed `lr_ratio = max_lr / base_lr` whose lowest value is above 1, or, when
`base_lr` is given directly, the highest `base_lr` must lie below the lowest `max_lr`.
Both are checked here, once, when the spec is built, so every point of the space is a
valid trial.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Mode = Literal["triangular", "triangular2", "exp_range"]
ScaleMode = Literal["cycle", "iterations"]
StepUnit = Literal["epochs", "iterations"]
Objective = Literal["val_loss", "val_accuracy"]
SamplerName = Literal["tpe", "random", "cmaes", "qmc", "gp"]
PrunerName = Literal["none", "median", "percentile", "hyperband", "successive_halving"]
DatasetName = Literal["digits", "fake", "mnist", "fashion_mnist", "cifar10", "imagefolder"]
OptimizerName = Literal["sgd", "adamw"]

BUILTIN_MODELS = ("cnn", "mlp")
# torchvision classifiers the worker knows how to adapt to small inputs and other
# channel and class counts. Kept as a closed list so a typo fails at submission.
TORCHVISION_MODELS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
)
MODEL_NAMES = BUILTIN_MODELS + TORCHVISION_MODELS

# Far beyond any useful value; they keep arithmetic on the schedule finite.
MAX_LR = 1e6
MAX_STEP_SIZE = 1e9

STUDY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatRange(_Strict):
    """A searched float: sampled between `low` and `high`, on a log scale when `log`."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _check_bounds(self) -> FloatRange:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"low and high must be finite, got low={self.low}, high={self.high}")
        if self.low >= self.high:
            raise ValueError(
                f"low must be below high, got low={self.low}, high={self.high}; "
                "give a single number to fix the value instead"
            )
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got low={self.low}")
        return self


FloatParam = float | FloatRange


def lowest(value: FloatParam) -> float:
    return value.low if isinstance(value, FloatRange) else value


def highest(value: FloatParam) -> float:
    return value.high if isinstance(value, FloatRange) else value


def _positive(name: str, value: FloatParam | None) -> None:
    if value is not None and lowest(value) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def _choices_unique(values: list[Any], field: str) -> None:
    if not values:
        raise ValueError(f"{field}: a searched choice needs at least one value")
    if len(set(values)) != len(values):
        raise ValueError(f"{field}: choices must be distinct, got {values}")


class CyclicSpace(_Strict):
    """Every `CyclicLR` argument, each fixed (a value) or searched (a range or a list).

    The defaults search `max_lr` on a log scale and derive `base_lr` from a ratio of 3 to
    10, the rule of thumb of Smith's paper, with half cycles of 1 to 4 epochs.
    """

    max_lr: FloatParam = FloatRange(low=0.01, high=0.5, log=True)
    base_lr: FloatParam | None = None
    lr_ratio: FloatParam | None = FloatRange(low=3.0, high=10.0, log=True)
    step_size_up: FloatParam = FloatRange(low=1.0, high=4.0)
    step_size_down: FloatParam | None = None
    step_size_unit: StepUnit = "epochs"
    mode: Mode | list[Mode] = "triangular"
    gamma: FloatParam | None = None
    scale_mode: ScaleMode | list[ScaleMode] | None = None
    cycle_momentum: bool | list[bool] = True
    base_momentum: FloatParam = 0.85
    max_momentum: FloatParam = 0.95

    @field_validator("mode", "scale_mode", "cycle_momentum")
    @classmethod
    def _distinct_choices(cls, value: Any, info: Any) -> Any:
        if isinstance(value, list):
            _choices_unique(value, info.field_name)
        return value

    @model_validator(mode="after")
    def _check_space(self) -> CyclicSpace:
        _positive("max_lr", self.max_lr)
        if highest(self.max_lr) > MAX_LR:
            raise ValueError(f"max_lr must not exceed {MAX_LR:g}, got {self.max_lr!r}")
        if self.base_lr is not None and self.lr_ratio is not None:
            if "lr_ratio" in self.model_fields_set:
                raise ValueError(
                    "give either base_lr or lr_ratio (max_lr / base_lr), not both"
                )
            # base_lr given explicitly replaces the default ratio.
            object.__setattr__(self, "lr_ratio", None)
        if self.base_lr is None and self.lr_ratio is None:
            raise ValueError("give base_lr or lr_ratio (max_lr / base_lr)")
        if self.lr_ratio is not None and lowest(self.lr_ratio) <= 1:
            raise ValueError(
                f"lr_ratio must be above 1 so that max_lr > base_lr, got {self.lr_ratio!r}"
            )
        if self.base_lr is not None:
            _positive("base_lr", self.base_lr)
            if highest(self.base_lr) >= lowest(self.max_lr):
                raise ValueError(
                    f"base_lr must stay below max_lr for every trial: the highest base_lr "
                    f"({highest(self.base_lr)}) is not below the lowest max_lr "
                    f"({lowest(self.max_lr)}); narrow the ranges or use lr_ratio"
                )
        for name in ("step_size_up", "step_size_down"):
            value = getattr(self, name)
            if value is not None and lowest(value) < 1 and self.step_size_unit == "iterations":
                raise ValueError(f"{name} must be at least 1 iteration, got {value!r}")
            if value is not None and lowest(value) <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
            if value is not None and highest(value) > MAX_STEP_SIZE:
                raise ValueError(f"{name} must not exceed {MAX_STEP_SIZE:g}, got {value!r}")
        modes = self.mode if isinstance(self.mode, list) else [self.mode]
        if self.gamma is not None:
            if "exp_range" not in modes:
                raise ValueError(
                    f"gamma only applies to mode exp_range, but mode is {self.mode!r}; "
                    "remove gamma or add exp_range to mode"
                )
            if lowest(self.gamma) <= 0 or highest(self.gamma) > 1:
                raise ValueError(f"gamma must lie in (0, 1], got {self.gamma!r}")
        elif "exp_range" in modes:
            # gamma ** iterations is what is left of the cycle height; 0.999 keeps
            # about a third after 1,000 iterations, 0.99999 nearly all of it.
            object.__setattr__(self, "gamma", FloatRange(low=0.999, high=0.99999))
        for name in ("base_momentum", "max_momentum"):
            value = getattr(self, name)
            if lowest(value) < 0 or highest(value) >= 1:
                raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
        if highest(self.base_momentum) > lowest(self.max_momentum):
            raise ValueError(
                f"base_momentum must not exceed max_momentum for any trial: highest "
                f"base_momentum {highest(self.base_momentum)} > lowest max_momentum "
                f"{lowest(self.max_momentum)}"
            )
        return self


class OptimizerSpec(_Strict):
    """The optimizer. For AdamW, `momentum` is beta1 (the value CyclicLR cycles)."""

    name: OptimizerName = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False

    @model_validator(mode="after")
    def _check_nesterov(self) -> OptimizerSpec:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs the sgd optimizer with a momentum above 0")
        return self


class TaskSpec(_Strict):
    """What each trial trains: the same for every trial of a study."""

    dataset: DatasetName = "digits"
    data_path: str | None = None
    model: str = "cnn"
    optimizer: OptimizerSpec = OptimizerSpec()
    epochs: int = Field(8, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=65536)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = Field(0, ge=0)
    fake_size: int = Field(512, ge=16, le=100000)
    image_size: int | None = Field(None, ge=8, le=1024)
    # Forward and loss arithmetic. "auto": bfloat16 autocast on a CUDA device that
    # supports it, float32 elsewhere (CPU results are those of plain float32).
    precision: Literal["auto", "float32", "bfloat16"] = "auto"

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODEL_NAMES:
            raise ValueError(f"unknown model {value!r}; choose one of {', '.join(MODEL_NAMES)}")
        return value

    @model_validator(mode="after")
    def _check_data_path(self) -> TaskSpec:
        if self.dataset == "imagefolder" and not self.data_path:
            raise ValueError("dataset imagefolder needs data_path, a folder on the workers")
        return self


class PrunerSpec(_Strict):
    """Optuna's pruner, optionally made cycle-aware.

    `cycle_aware` compares trials only at epochs that end a whole cycle (where the LR is
    back at its low point); by default it is on when the space searches step sizes,
    because then trials at the same epoch sit at different points of their cycles.
    """

    name: PrunerName = "median"
    n_startup_trials: int = Field(4, ge=0)
    n_warmup_steps: int = Field(1, ge=0)
    percentile: float = Field(50.0, gt=0, lt=100)
    reduction_factor: int = Field(3, ge=2)
    cycle_aware: bool | None = None


BaselineSchedule = Literal["fixed", "step", "cosine", "onecycle"]


class BaselineSpec(_Strict):
    """Comparison runs on the same task, budget and seed, kept out of the search.

    `lr` defaults to the geometric centre of the searched base_lr and max_lr (for
    `fixed`) and to the centre of max_lr (the peak of `step`, `cosine`, `onecycle`).
    """

    schedules: list[BaselineSchedule] = Field(default_factory=lambda: ["fixed"], min_length=1)
    lr: float | None = Field(None, gt=0)
    peak_lr: float | None = Field(None, gt=0)

    @field_validator("schedules")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        _choices_unique(value, "baselines.schedules")
        return value


class BaselineParams(_Strict):
    """One baseline run: `fixed` at `lr`; `step` (x0.1 at 50% and 75% of training),
    `cosine` (to 0) and `onecycle` (torch's OneCycleLR) starting from or peaking at `lr`."""

    schedule: BaselineSchedule
    lr: float = Field(gt=0)


class RangeTestSpec(_Strict):
    """Smith's LR range test: the LR ramps from start_lr to end_lr over `epochs`."""

    start_lr: float = Field(1e-5, gt=0)
    end_lr: float = Field(10.0, gt=0)
    epochs: int = Field(2, ge=1, le=100)
    ramp: Literal["exponential", "linear"] = "exponential"
    # Weight of the newest loss in the exponential moving average.
    smoothing: float = Field(0.05, gt=0, le=1)
    # The test stops once the smoothed loss exceeds this multiple of its best value.
    divergence_factor: float = Field(4.0, gt=1)

    @model_validator(mode="after")
    def _check_range(self) -> RangeTestSpec:
        if self.end_lr <= self.start_lr:
            raise ValueError(
                f"end_lr must be above start_lr, got start_lr={self.start_lr}, "
                f"end_lr={self.end_lr}"
            )
        return self


def geometric_centre(value: FloatParam) -> float:
    if isinstance(value, FloatRange):
        if value.low > 0:
            return math.sqrt(value.low * value.high)
        return (value.low + value.high) / 2
    return value


class StudySpec(_Strict):
    """A study: a name, the search space, the task, and how to search.

    `{"name": "x"}` is a complete spec: 20 trials of a small CNN on the bundled digits
    data, TPE with a median pruner, two trials at a time.
    """

    name: str
    space: CyclicSpace = CyclicSpace()
    task: TaskSpec = TaskSpec()
    objective: Objective = "val_loss"
    sampler: SamplerName = "tpe"
    pruner: PrunerSpec | PrunerName = PrunerSpec()
    # 0 only with lr_bounds "auto": a study that runs just the range test.
    n_trials: int = Field(20, ge=0, le=100000)
    parallelism: int = Field(2, ge=1, le=1024)
    # Re-runs of a trial lost to infrastructure (lapsed lease, worker shut down).
    max_retries: int = Field(2, ge=0, le=100)
    # More failed trials than this (errors in training, or retries used up) stop the study.
    max_failed_trials: int = Field(5, ge=0, le=100000)
    enqueue: list[dict[str, Any]] = Field(default_factory=list, max_length=1000)
    sampler_seed: int | None = None
    baselines: BaselineSpec | None = None
    # "auto": run an LR range test first and centre the max_lr and lr_ratio ranges on
    # the bounds it suggests.
    lr_bounds: Literal["auto"] | None = None
    range_test: RangeTestSpec = RangeTestSpec()

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not STUDY_NAME_PATTERN.match(value):
            raise ValueError(
                f"study name {value!r} must be 1-100 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    def baseline_runs(self) -> list[BaselineParams]:
        """The baseline runs of this study, with default LRs filled in."""
        if self.baselines is None:
            return []
        peak = self.baselines.peak_lr or geometric_centre(self.space.max_lr)
        if self.space.lr_ratio is not None:
            low = geometric_centre(self.space.max_lr) / geometric_centre(self.space.lr_ratio)
        else:
            low = geometric_centre(self.space.base_lr)  # type: ignore[arg-type]
        fixed = self.baselines.lr or math.sqrt(low * geometric_centre(self.space.max_lr))
        return [
            BaselineParams(schedule=schedule, lr=fixed if schedule == "fixed" else peak)
            for schedule in self.baselines.schedules
        ]

    @property
    def cycle_aware_pruning(self) -> bool:
        pruner = self.pruner
        assert isinstance(pruner, PrunerSpec)  # the validator expands the shorthand
        if pruner.name == "none":
            return False
        if pruner.cycle_aware is not None:
            return pruner.cycle_aware
        searched = searched_params(self.space)
        return "step_size_up" in searched or "step_size_down" in searched

    @model_validator(mode="after")
    def _check_study(self) -> StudySpec:
        if self.task.optimizer.name == "sgd" and self.task.optimizer.momentum == 0:
            cycles = self.space.cycle_momentum
            if cycles is True or (isinstance(cycles, list) and True in cycles):
                raise ValueError(
                    "space.cycle_momentum is on but the SGD optimizer has momentum 0: "
                    "CyclicLR would silently turn momentum on. Set cycle_momentum to false "
                    "or give the optimizer a momentum"
                )
        searched = searched_params(self.space)
        if self.sampler == "cmaes":
            categorical = [n for n, kind in searched.items() if kind == "choice"]
            if categorical:
                raise ValueError(
                    f"sampler cmaes cannot search choices ({', '.join(categorical)}); fix "
                    "them to one value or use tpe, gp or random"
                )
        if self.sampler in ("cmaes", "qmc", "gp") and "gamma" in searched:
            if isinstance(self.space.mode, list):
                raise ValueError(
                    f"sampler {self.sampler} cannot search gamma only when mode is "
                    "exp_range (a conditional space); fix mode or use tpe or random"
                )
        if self.n_trials == 0 and self.lr_bounds != "auto":
            raise ValueError("n_trials must be at least 1 (0 only with lr_bounds auto, "
                             "which runs just the range test)")
        if self.lr_bounds == "auto" and self.space.base_lr is not None:
            raise ValueError(
                "lr_bounds auto sets max_lr and lr_ratio from the range test; remove "
                "space.base_lr (or set the bounds yourself and drop lr_bounds)"
            )
        for index, params in enumerate(self.enqueue):
            unknown = sorted(set(params) - set(searched))
            if unknown:
                raise ValueError(
                    f"enqueue[{index}] names {', '.join(unknown)}, which the space does "
                    f"not search; searched parameters: {', '.join(searched) or 'none'}"
                )
        return self


def searched_params(space: CyclicSpace) -> dict[str, str]:
    """The names of the searched parameters, each with its kind ('float' or 'choice')."""
    kinds: dict[str, str] = {}
    for name in CyclicSpace.model_fields:
        value = getattr(space, name)
        if isinstance(value, FloatRange):
            kinds[name] = "float"
        elif isinstance(value, list):
            if len(value) > 1:
                kinds[name] = "choice"
    return kinds


class CyclicParams(_Strict):
    """The concrete CyclicLR settings of one trial, as torch will be given them.

    Step sizes are still in `step_size_unit`; the worker converts epochs to iterations
    with the real number of batches per epoch (`iterations_for`).
    """

    base_lr: Annotated[float, Field(gt=0, le=MAX_LR)]
    max_lr: Annotated[float, Field(gt=0, le=MAX_LR)]
    step_size_up: Annotated[float, Field(gt=0, le=MAX_STEP_SIZE)]
    step_size_down: Annotated[float, Field(gt=0, le=MAX_STEP_SIZE)] | None = None
    step_size_unit: StepUnit = "epochs"
    mode: Mode = "triangular"
    gamma: Annotated[float, Field(gt=0, le=1)] = 1.0
    scale_mode: ScaleMode | None = None
    cycle_momentum: bool = True
    base_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.85
    max_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.95

    @model_validator(mode="after")
    def _check_range(self) -> CyclicParams:
        if self.max_lr <= self.base_lr:
            raise ValueError(
                f"max_lr must be above base_lr, got base_lr={self.base_lr}, max_lr={self.max_lr}"
            )
        if self.base_momentum > self.max_momentum:
            raise ValueError(
                f"base_momentum must not exceed max_momentum, got {self.base_momentum} > "
                f"{self.max_momentum}"
            )
        return self

    def iterations_for(self, batches_per_epoch: int) -> tuple[int, int]:
        """Step sizes in optimizer steps: (up, down), each at least 1."""
        up = self.step_size_up
        down = self.step_size_down if self.step_size_down is not None else up
        if self.step_size_unit == "epochs":
            up, down = up * batches_per_epoch, down * batches_per_epoch
        return max(1, round(up)), max(1, round(down))
