"""Smith's claim on the bundled digits data: CyclicLR reaches a fixed LR's final accuracy
in a fraction of the iterations.

    python -m benchmarks.clr_vs_fixed            # 5 seeds, 16 epochs, mlp; about 30 s

The figure of Smith's paper (CIFAR-10): `triangular2` reached the fixed-LR run's final
accuracy of 81.4% after 25,000 iterations instead of 70,000, 0.36x. Here, per seed:

1. Fixed-LR runs of `--epochs` epochs (SGD, momentum 0.9, weight decay 5e-4, batch 32)
   at three LRs read off the range test: `base_lr`, `max_lr` and their geometric mean.
   Their final validation accuracies are the targets.
2. One CyclicLR run of the same budget, trained by `worker.training.train_trial` itself,
   evaluated at every epoch end. Its figure against a target is the first iteration at
   which its validation accuracy reaches that target, divided by the fixed run's budget
   (Smith's definition); a stricter ratio divides by the iteration at which the fixed
   run itself first reached its final accuracy.

The CyclicLR setting and the LR bounds are chosen once, on development seeds that are
not among the evaluation seeds, so that the evaluation does not pick its own winner:
the range test (`worker.range_test`, bounds by `clrsearch.lr_bounds.suggest_bounds`)
runs on each development seed and the geometric means of its bounds are used; then
a small grid (mode `triangular` or `triangular2`, half cycles of 2, 3 or 4 epochs,
momentum fixed at 0.9 or cycled 0.95-0.85) is tried there, and the setting with the
lowest median ratio against the best fixed LR of each development seed wins.

"Best fixed" on an evaluation seed is the fixed LR with the highest final accuracy on
that very seed: chosen after the fact, so it favours the baseline.

The fixed-LR runs use a small loop of this file that mirrors `train_trial` (same model
initialisation, same shuffling generator, same batches, the LR held by the `fixed`
schedule of `worker.baselines`), because `train_trial` builds a CyclicLR only. Before
anything is measured the loop is run once with the trial's CyclicLR and must give
exactly `train_trial`'s epochs, so the two differ in the schedule alone.

Goal (issue 7): a median ratio of 0.5 or better, with its spread across seeds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.optim.lr_scheduler import LRScheduler  # noqa: E402

from benchmarks._common import table  # noqa: E402
from clrsearch.lr_bounds import suggest_bounds  # noqa: E402
from clrsearch.spec import (  # noqa: E402
    BaselineParams,
    CyclicParams,
    Mode,
    OptimizerSpec,
    RangeTestSpec,
    TaskSpec,
)
from worker.baselines import build_baseline_scheduler  # noqa: E402
from worker.data import DatasetCache, PreparedData  # noqa: E402
from worker.models import build_model  # noqa: E402
from worker.range_test import run_range_test  # noqa: E402
from worker.schedule import build_optimizer, build_scheduler  # noqa: E402
from worker.training import EpochResult, batch_bounds, train_trial  # noqa: E402

GOAL = 0.5
CPU = torch.device("cpu")
# Development seeds sit far from the evaluation seeds (0, 1, ...), so the two never meet.
DEVELOPMENT_SEEDS = (1000, 1001, 1002)
MODES: tuple[Mode, ...] = ("triangular", "triangular2")
STEP_SIZES_EPOCHS = (2.0, 3.0, 4.0)
FIXED_NAMES = ("base_lr", "centre", "max_lr")


@dataclass(frozen=True)
class Curve:
    """Validation accuracy at the end of each epoch, and the iterations done by then."""

    iterations: list[int]
    accuracies: list[float]

    @property
    def final(self) -> float:
        return self.accuracies[-1]

    @property
    def budget(self) -> int:
        return self.iterations[-1]

    def first_reaching(self, target: float) -> int | None:
        """The first iteration count at which the accuracy is at least `target`."""
        return next((it for it, acc in zip(self.iterations, self.accuracies, strict=True)
                     if acc >= target), None)


@dataclass(frozen=True)
class Comparison:
    cyclic_iterations: int | None
    fixed_budget: int
    fixed_first: int

    @property
    def ratio(self) -> float:
        """Smith's figure: iterations to the fixed run's final accuracy over its budget."""
        return _ratio(self.cyclic_iterations, self.fixed_budget)

    @property
    def strict_ratio(self) -> float:
        """The same over the iterations the fixed run itself took to first get there."""
        return _ratio(self.cyclic_iterations, self.fixed_first)


def _ratio(iterations: int | None, reference: int) -> float:
    # A target never reached counts as infinitely slow, so it sorts last and is never
    # mistaken for a win; medians then stay honest.
    return math.inf if iterations is None else iterations / reference


def compare(cyclic: Curve, fixed: Curve) -> Comparison:
    first = fixed.first_reaching(fixed.final)
    assert first is not None  # the final epoch reaches the final accuracy
    return Comparison(cyclic.first_reaching(fixed.final), fixed.budget, first)


# -- training -------------------------------------------------------------------------------


def cyclic_curve(params: CyclicParams, task: TaskSpec, data: PreparedData) -> Curve:
    """A CyclicLR run through the worker's own training loop."""
    epochs: list[EpochResult] = []

    def record(result: EpochResult) -> str:
        epochs.append(result)
        return "continue"

    train_trial(params, task, "val_accuracy", data, CPU, record)
    return Curve([e.iterations for e in epochs], [e.val_accuracy for e in epochs])


def mirrored_curve(
    task: TaskSpec, data: PreparedData, lr: float,
    schedule: Callable[[torch.optim.Optimizer, int], LRScheduler],
) -> Curve:
    """`train_trial`'s loop with any per-step schedule, evaluated at every epoch end.

    The order of seeding, building and drawing is train_trial's, so that a run differs
    from a trial's only in the schedule: checked by `check_mirror`.
    """
    torch.manual_seed(task.seed)
    model = build_model(task.model, data.in_channels, data.image_size, data.num_classes)
    optimizer = build_optimizer(model.parameters(), task.optimizer, lr=lr)
    bounds = batch_bounds(len(data.train_y), task.batch_size)
    scheduler = schedule(optimizer, len(bounds))
    shuffle = torch.Generator().manual_seed(task.seed)

    iterations: list[int] = []
    accuracies: list[float] = []
    iteration = 0
    for _epoch in range(task.epochs):
        model.train()
        order = torch.randperm(len(data.train_y), generator=shuffle)
        for start, end in bounds:
            index = order[start:end]
            loss = F.cross_entropy(model(data.train_x[index]), data.train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            iteration += 1
        iterations.append(iteration)
        accuracies.append(_accuracy(model, data))
    return Curve(iterations, accuracies)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, data: PreparedData) -> float:
    # The whole validation part of digits (360 images) is one batch, as in train_trial.
    model.eval()
    predicted = model(data.val_x).argmax(dim=1)
    # A count over the size in float64, as train_trial divides, so the two agree exactly.
    return int((predicted == data.val_y).sum()) / len(data.val_y)


def fixed_curve(task: TaskSpec, data: PreparedData, lr: float) -> Curve:
    baseline = BaselineParams(schedule="fixed", lr=lr)
    return mirrored_curve(
        task, data, lr,
        lambda optimizer, steps: build_baseline_scheduler(optimizer, baseline,
                                                          steps * task.epochs),
    )


def check_mirror(params: CyclicParams, task: TaskSpec, data: PreparedData) -> None:
    """The local loop with the trial's CyclicLR must give train_trial's accuracies."""
    mirrored = mirrored_curve(
        task, data, params.base_lr,
        lambda optimizer, steps: build_scheduler(optimizer, params, steps),
    )
    reference = cyclic_curve(params, task, data)
    if mirrored != reference:
        raise SystemExit(
            f"the fixed-LR loop no longer mirrors worker.training.train_trial: with the same "
            f"CyclicLR it gives {mirrored.accuracies} instead of {reference.accuracies}; "
            "update mirrored_curve to follow train_trial"
        )


# -- choosing the bounds and the setting on development seeds --------------------------------


def range_test_bounds(task: TaskSpec, data: PreparedData) -> tuple[float, float]:
    result = run_range_test(RangeTestSpec(), task, data, CPU)
    bounds = suggest_bounds(result.lrs, result.losses)
    return bounds.base_lr, bounds.max_lr


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(value) for value in values))


def fixed_lrs(base_lr: float, max_lr: float) -> dict[str, float]:
    return {"base_lr": base_lr, "centre": math.sqrt(base_lr * max_lr), "max_lr": max_lr}


def grid(base_lr: float, max_lr: float) -> list[CyclicParams]:
    settings = []
    for mode in MODES:
        for step in STEP_SIZES_EPOCHS:
            for cycle_momentum in (False, True):
                settings.append(CyclicParams(
                    base_lr=base_lr, max_lr=max_lr, step_size_up=step, mode=mode,
                    cycle_momentum=cycle_momentum,
                ))
    return settings


def describe(params: CyclicParams) -> str:
    momentum = "cycled 0.95-0.85" if params.cycle_momentum else "0.9"
    return f"{params.mode}, half cycle {params.step_size_up:g} epochs, momentum {momentum}"


def best_fixed(curves: dict[str, Curve]) -> Curve:
    # Ties go to the LR that got there first: the harder target for CyclicLR.
    return max(curves.values(), key=lambda c: (c.final, -c.first_reaching(c.final)))


# -- figures --------------------------------------------------------------------------------


def spread(ratios: Sequence[float]) -> str:
    """Median, interquartile range and min-max, as one cell."""
    if not ratios:
        return "n/a"
    ordered = sorted(ratios)
    q1, median, q3 = (_quantile(ordered, q) for q in (0.25, 0.5, 0.75))
    return (f"{_fmt(median)} (IQR {_fmt(q1)}-{_fmt(q3)}, "
            f"min-max {_fmt(ordered[0])}-{_fmt(ordered[-1])})")


def _quantile(ordered: Sequence[float], q: float) -> float:
    # Linear interpolation between order statistics (numpy's default), written out
    # because numpy turns an infinite neighbour into nan.
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    if low == high or ordered[low] == ordered[high]:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _fmt(ratio: float) -> str:
    return "never" if math.isinf(ratio) else f"{ratio:.2f}"


def _iterations(value: int | None) -> str:
    return "never" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="evaluation seeds (default 5)")
    parser.add_argument("--epochs", type=int, default=16,
                        help="budget of every run, in epochs (default 16)")
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp",
                        help="mlp (64-128-10, as in the pilot; default) or cnn")
    args = parser.parse_args()
    # The machine is shared; one thread also makes the runs reproducible.
    torch.set_num_threads(1)
    started = time.perf_counter()
    cache = DatasetCache(Path("data"))

    def task_for(seed: int) -> TaskSpec:
        return TaskSpec(dataset="digits", model=args.model, epochs=args.epochs, batch_size=32,
                        seed=seed, optimizer=OptimizerSpec(name="sgd", momentum=0.9))

    print(f"CyclicLR against fixed LRs on digits, {args.model}, {args.epochs} epochs, "
          f"{args.seeds} seeds; torch {torch.__version__}, 1 thread")

    # Bounds from the range test on the development seeds
    development = [(task_for(seed), cache.get(task_for(seed))) for seed in DEVELOPMENT_SEEDS]
    tested = [range_test_bounds(task, data) for task, data in development]
    base_lr = geometric_mean([low for low, _ in tested])
    max_lr = geometric_mean([high for _, high in tested])
    print(f"\nrange test on development seeds {', '.join(map(str, DEVELOPMENT_SEEDS))}: "
          + "; ".join(f"{low:.4g}-{high:.4g}" for low, high in tested)
          + f"; bounds used: base_lr {base_lr:.4g}, max_lr {max_lr:.4g}")
    check_mirror(grid(base_lr, max_lr)[0], *development[0])

    # The setting: the lowest median ratio against each development seed's best fixed LR
    lrs = fixed_lrs(base_lr, max_lr)
    targets = [best_fixed({name: fixed_curve(task, data, lr) for name, lr in lrs.items()})
               for task, data in development]
    rows, scored = [], []
    for params in grid(base_lr, max_lr):
        ratios = [compare(cyclic_curve(params, task, data), target).ratio
                  for (task, data), target in zip(development, targets, strict=True)]
        scored.append((statistics.median(ratios), params))
        rows.append([describe(params), *(_fmt(r) for r in ratios),
                     _fmt(statistics.median(ratios))])
    chosen = min(scored, key=lambda pair: pair[0])[1]
    print("\nsettings tried on the development seeds (ratio against the best fixed LR):\n")
    print(table(["setting", *(f"seed {s}" for s in DEVELOPMENT_SEEDS), "median"], rows))
    print(f"\nchosen: {describe(chosen)}")

    # Evaluation seeds: the chosen setting against each fixed LR
    by_fixed: dict[str, list[Comparison]] = {name: [] for name in (*FIXED_NAMES, "best")}
    rows = []
    for seed in range(args.seeds):
        task = task_for(seed)
        data = cache.get(task)
        fixed = {name: fixed_curve(task, data, lr) for name, lr in lrs.items()}
        cyclic = cyclic_curve(chosen, task, data)
        best = best_fixed(fixed)
        best_name = next(name for name, curve in fixed.items() if curve is best)
        comparisons = {name: compare(cyclic, curve) for name, curve in fixed.items()}
        comparisons["best"] = compare(cyclic, best)
        for name, comparison in comparisons.items():
            by_fixed[name].append(comparison)
        rows.append([
            seed,
            *(f"{fixed[n].final:.3f} / {comparisons[n].fixed_first} / "
              f"{_iterations(comparisons[n].cyclic_iterations)} / {_fmt(comparisons[n].ratio)}"
              for n in FIXED_NAMES),
            best_name,
            f"{cyclic.final:.3f}",
        ])
    budget = args.epochs * len(batch_bounds(len(data.train_y), 32))
    print(f"\nper seed: fixed run's final accuracy / iterations the fixed run first reached "
          f"it / iterations CyclicLR first reached it / ratio of the latter to the fixed "
          f"budget of {budget} iterations\n")
    print(table(["seed", *(f"fixed at {n} ({lrs[n]:.4g})" for n in FIXED_NAMES),
                 "best fixed", "CyclicLR final"], rows))

    print(f"\nmedian ratio across {args.seeds} seeds, with its spread\n")
    summary = []
    for name, comparisons in by_fixed.items():
        label = "best fixed (per seed)" if name == "best" else f"fixed at {name}"
        summary.append([
            label,
            spread([c.ratio for c in comparisons]),
            spread([c.strict_ratio for c in comparisons]),
        ])
    print(table(["against", "ratio to the fixed budget",
                 "ratio to the fixed run's own first reach"], summary))
    verdicts = []
    for name in FIXED_NAMES:
        median = statistics.median(c.ratio for c in by_fixed[name])
        verdicts.append(f"at {name} {_fmt(median)}, {'met' if median <= GOAL else 'not met'}")
    print(f"\ngoal: a median ratio to the fixed budget of {GOAL} or better; against a fixed LR "
          f"{'; '.join(verdicts)}. {time.perf_counter() - started:.0f} s in all")

if __name__ == "__main__":
    main()
