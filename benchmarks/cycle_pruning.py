"""Cycle-aware pruning against Optuna's median pruner and against no pruning, on the
same trials.

    python -m benchmarks.cycle_pruning           # 5 studies of 24 trials; about 30 s

Each study samples `--trials` settings with a seeded `RandomSampler` through the
server's own `suggest_params`, from a space that searches both step sizes (1 to 4
epochs up, 1 to 4 down), `max_lr` (0.01-0.5, log), the ratio to `base_lr` (3-10) and
the mode (`triangular`, `triangular2`); the task is digits, `mlp`, 8 epochs, batch 32,
objective `val_loss` (the default). Every trial is trained once, fully, without
pruning, by `worker.training.train_trial`, and every epoch's validation loss is kept.

The same trials are then replayed, in the same order, through an in-memory Optuna study
per pruner, as the server drives it (`service.domain.report`):

- no pruning;
- `median`: Optuna's `MedianPruner`, shown the value of every epoch;
- `cycle-aware`: `CycleEndPercentilePruner` at the 50th percentile, shown only the
  epochs that end a cycle (`clrsearch.cycles.cycle_end_epochs`).

Both pruners are built by the server's `make_pruner` from the same pruner spec (by
default `n_startup_trials` 4, `n_warmup_steps` 1), once with `cycle_aware` off.
A pruned trial stops at the epoch it was pruned; a trial whose training diverged
stops (failed) at the epoch it diverged. Figures per pruner: epochs spent, the best
final value among the trials it let finish, and how many of the five best trials (by
final value of the full runs) it stopped early.

Replaying is fair and cheap: every pruner sees exactly the same trials, the same
curves and the same order (training is deterministic, so a pruned trial's epochs up
to the pruning point are the ones it would have run), and the training is paid once.
What replaying cannot show is a sampler that learns from pruned trials: with a random
sampler the settings do not depend on earlier results, so nothing is lost.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
import torch  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from benchmarks._common import quiet_optuna, table  # noqa: E402
from clrsearch.cycles import cycle_end_epochs  # noqa: E402
from clrsearch.spec import (  # noqa: E402
    CyclicParams,
    CyclicSpace,
    FloatRange,
    PrunerSpec,
    StudySpec,
    TaskSpec,
)
from service.optuna_bridge import (  # noqa: E402
    CycleEndPercentilePruner,
    make_pruner,
    suggest_params,
)
from worker.data import DatasetCache  # noqa: E402
from worker.training import (  # noqa: E402
    EpochResult,
    TrainingDiverged,
    batches_per_epoch,
    train_trial,
)

TOP = 5
CPU = torch.device("cpu")
SPACE = CyclicSpace(
    max_lr=FloatRange(low=0.01, high=0.5, log=True),
    lr_ratio=FloatRange(low=3.0, high=10.0, log=True),
    step_size_up=FloatRange(low=1.0, high=4.0),
    step_size_down=FloatRange(low=1.0, high=4.0),
    mode=["triangular", "triangular2"],
)


@dataclass
class FullRun:
    """One trial trained to the end (or to its divergence), never pruned."""

    number: int
    params: CyclicParams
    val_losses: list[float]
    batches_per_epoch: int
    diverged: bool

    @property
    def final(self) -> float:
        return math.inf if self.diverged else self.val_losses[-1]


@dataclass
class Replay:
    pruner: str
    epochs_spent: int = 0
    finished: list[int] = field(default_factory=list)
    # Trial number -> epoch at which the pruner stopped it.
    pruned: dict[int, int] = field(default_factory=dict)


@dataclass
class Totals:
    """One pruner's figures summed over the studies."""

    epochs_spent: int = 0
    epochs_full: int = 0
    pruned: int = 0
    pruned_at_last_epoch: int = 0
    top_stopped: int = 0
    top_count: int = 0
    best_kept: int = 0
    excess: list[float] = field(default_factory=list)


def study_spec(n_trials: int, epochs: int, seed: int, pruner: PrunerSpec) -> StudySpec:
    return StudySpec(
        name=f"cycle-pruning-{seed}", space=SPACE,
        task=TaskSpec(dataset="digits", model="mlp", epochs=epochs, batch_size=32, seed=0),
        objective="val_loss", sampler="random", sampler_seed=seed, pruner=pruner,
        n_trials=n_trials,
    )


def sample(spec: StudySpec) -> list[CyclicParams]:
    """The study's settings, drawn as the server draws them (the random sampler does not
    look at results, so drawing them all up front gives the same settings)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.sampler_seed))
    return [suggest_params(study.ask(), spec.space) for _ in range(spec.n_trials)]


def run_fully(number: int, params: CyclicParams, spec: StudySpec,
              cache: DatasetCache) -> FullRun:
    data = cache.get(spec.task)
    epochs: list[EpochResult] = []

    def record(result: EpochResult) -> str:
        epochs.append(result)
        return "continue"

    try:
        train_trial(params, spec.task, spec.objective, data, CPU, record)
        diverged = False
    except TrainingDiverged:
        diverged = True
    return FullRun(number, params, [e.val_loss for e in epochs],
                   batches_per_epoch(len(data.train_y), spec.task.batch_size), diverged)


def replay(name: str, runs: list[FullRun], pruner: optuna.pruners.BasePruner | None,
           epochs: int, cycle_aware: bool) -> Replay:
    """Feed the recorded curves to an in-memory study, in order, as the server would."""
    study = optuna.create_study(
        direction="minimize", pruner=pruner or optuna.pruners.NopPruner(),
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    result = Replay(name)
    for run in runs:
        trial = study.ask()
        shown = (set(cycle_end_epochs(run.params, run.batches_per_epoch, epochs))
                 if cycle_aware else set(range(1, epochs + 1)))
        stopped_at = None
        for epoch, value in enumerate(run.val_losses, 1):
            if epoch not in shown or pruner is None:
                continue
            trial.report(value, epoch)
            if trial.should_prune():
                stopped_at = epoch
                break
        if stopped_at is not None:
            study.tell(trial, state=TrialState.PRUNED)
            result.pruned[run.number] = stopped_at
            result.epochs_spent += stopped_at
        elif run.diverged:
            # The epoch that diverged was run (in part) before training gave up.
            study.tell(trial, state=TrialState.FAIL)
            result.epochs_spent += len(run.val_losses) + 1
        else:
            study.tell(trial, run.final)
            result.finished.append(run.number)
            result.epochs_spent += epochs
    return result


def pruners(spec: StudySpec) -> dict[str, tuple[optuna.pruners.BasePruner | None, bool]]:
    """Name -> (pruner, whether only cycle ends are shown), built as the server builds them."""
    assert isinstance(spec.pruner, PrunerSpec)
    plain = spec.model_copy(update={"pruner": spec.pruner.model_copy(
        update={"cycle_aware": False})})
    cyclic = spec.model_copy(update={"pruner": spec.pruner.model_copy(
        update={"cycle_aware": True})})
    median, cycle_end = make_pruner(plain), make_pruner(cyclic)
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert isinstance(cycle_end, CycleEndPercentilePruner)
    return {"none": (None, False), "median": (median, False),
            "cycle-aware": (cycle_end, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=24, help="trials per study (default 24)")
    parser.add_argument("--studies", type=int, default=5,
                        help="studies, with sampler seeds 0, 1, ... (default 5)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per trial (default 8)")
    parser.add_argument("--n-startup-trials", type=int, default=PrunerSpec().n_startup_trials)
    parser.add_argument("--n-warmup-steps", type=int, default=PrunerSpec().n_warmup_steps)
    args = parser.parse_args()
    # The machine is shared; one thread also makes the runs reproducible.
    torch.set_num_threads(1)
    quiet_optuna()
    started = time.perf_counter()
    cache = DatasetCache(Path("data"))
    pruner_spec = PrunerSpec(name="median", n_startup_trials=args.n_startup_trials,
                             n_warmup_steps=args.n_warmup_steps)
    print(f"cycle-aware pruning against the median pruner and no pruning: {args.studies} "
          f"studies of {args.trials} trials, digits, mlp, {args.epochs} epochs, objective "
          f"val_loss; n_startup_trials {args.n_startup_trials}, n_warmup_steps "
          f"{args.n_warmup_steps}; torch {torch.__version__}, optuna {optuna.__version__}, "
          "1 thread")

    rows = []
    totals: dict[str, Totals] = {}
    for seed in range(args.studies):
        # Train every trial of the study once, fully
        spec = study_spec(args.trials, args.epochs, seed, pruner_spec)
        runs = [run_fully(number, params, spec, cache)
                for number, params in enumerate(sample(spec))]
        ranked = sorted((run for run in runs if not run.diverged), key=lambda run: run.final)
        top = {run.number for run in ranked[:TOP]}
        best = ranked[0].final
        cycle_ends = statistics.mean(
            len(cycle_end_epochs(run.params, run.batches_per_epoch, args.epochs)) for run in runs)
        print(f"study {seed}: best final val_loss {best:.4f} (trial {ranked[0].number}), "
              f"top {TOP} trials {sorted(top)}, {sum(run.diverged for run in runs)} diverged, "
              f"{cycle_ends:.1f} cycle-end epochs per trial on average")

        # Replay them through each pruner
        for name, (pruner, cycle_aware) in pruners(spec).items():
            result = replay(name, runs, pruner, args.epochs, cycle_aware)
            found = min(runs[number].final for number in result.finished)
            stopped = sorted(top & set(result.pruned))
            last = sum(epoch == args.epochs for epoch in result.pruned.values())
            total = totals.setdefault(name, Totals())
            total.epochs_spent += result.epochs_spent
            total.epochs_full += args.trials * args.epochs
            total.pruned += len(result.pruned)
            total.pruned_at_last_epoch += last
            total.top_stopped += len(stopped)
            total.top_count += len(top)
            total.best_kept += found == best
            total.excess.append(found - best)
            rows.append([
                seed, name, result.epochs_spent,
                f"{result.epochs_spent / (args.trials * args.epochs):.0%}",
                f"{len(result.pruned)} ({last})", f"{found:.4f}", f"{found - best:+.4f}",
                f"{len(stopped)}" + (f" (#{', #'.join(map(str, stopped))})" if stopped else ""),
            ])

    print("\nper study (val_loss, lower is better; a pruned trial counts the epochs it ran)\n")
    print(table(["study", "pruner", "epochs spent", "of full",
                 "pruned (at the last epoch)", "best value found", "vs best of all",
                 f"top {TOP} stopped"], rows))

    print(f"\nall {args.studies} studies together\n")
    print(table(
        ["pruner", "epochs spent", "of full", "pruned (at the last epoch)",
         f"top {TOP} stopped", "best trial kept", "best found vs best of all, median"],
        [[name, t.epochs_spent, f"{t.epochs_spent / t.epochs_full:.0%}",
          f"{t.pruned} ({t.pruned_at_last_epoch})", f"{t.top_stopped}/{t.top_count}",
          f"{t.best_kept}/{args.studies}", f"{statistics.median(t.excess):+.4f}"]
         for name, t in totals.items()],
    ))
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
