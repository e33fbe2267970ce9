"""What ask-ahead costs the search: plain Optuna, sequential against lagged by one trial.

    python -m benchmarks.ask_ahead_search --trials 1000 --seeds 5

With `CLRSEARCH_ASK_AHEAD=true` a study's next trial is drafted while the last one
still runs, so the draft may miss that trial's result: the search is then what plain
Optuna does when the next trial is asked before the last one is told. This script runs
exactly that, in memory and with no server, for several sampler seeds: the same study
as `benchmarks.dispatch` (TPE with Optuna 5's defaults, its five parameters and
simulated losses, `MedianPruner()` asked at every report but the last), once sequential
(`lag 0`, what the server does with ask-ahead off) and once with one trial asked ahead
(`lag 1`). The baseline is the sequential search of the same seeds, in the same run.

One seed says little: `benchmarks.dispatch` compares the service with Optuna by hand
on seed 0, where the two agree trial for trial with ask-ahead off, but a lagged search
on seed 0 is a different random draw, and seeds differ widely.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import optuna

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as common  # noqa: E402


def search(seed: int, n_trials: int, lag: int) -> tuple[int, float, float]:
    """One study: (complete trials, best value, median of the best 10 values)."""
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner())

    def ask() -> tuple[optuna.Trial, dict]:
        trial = study.ask()
        return trial, common.suggest(trial)

    asked_ahead = [ask() for _ in range(lag)]
    values: list[float] = []
    for _ in range(n_trials):
        asked_ahead.append(ask())
        trial, params = asked_ahead.pop(0)
        pruned = False
        for epoch, loss in enumerate(common.simulated_losses(params, trial.number), 1):
            trial.report(loss, epoch)
            if epoch < common.EPOCHS and trial.should_prune():
                pruned = True
                break
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, loss)
            values.append(loss)
    for trial, _ in asked_ahead:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return len(values), min(values), float(np.median(sorted(values)[:10]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=300, help="trials per study (300)")
    parser.add_argument("--seeds", type=int, default=5, help="sampler seeds 0..N-1 (5)")
    args = parser.parse_args()
    common.quiet_optuna()
    print(f"ask-ahead's cost to the search, {args.trials} trials, seeds 0-{args.seeds - 1}; "
          f"{common.machine()}\n")
    results = {lag: [search(seed, args.trials, lag) for seed in range(args.seeds)]
               for lag in (0, 1)}
    rows = []
    for lag, label in ((0, "sequential (ask-ahead off)"), (1, "lagged by one (ask-ahead)")):
        complete, best, best_10 = zip(*results[lag], strict=True)
        rows.append([label, " ".join(f"{v:.4f}" for v in best_10),
                     f"{statistics.median(best_10):.4f}", f"{statistics.median(best):.4f}",
                     f"{statistics.median(complete):.0f}"])
    print(common.table(["simulated val_loss (lower is better)", "best-10 median, per seed",
                        "median", "best, median", "complete trials, median"], rows))
    ratio = (statistics.median(r[2] for r in results[1])
             / statistics.median(r[2] for r in results[0]))
    print(f"\nlagged / sequential, median of the best-10 medians: {ratio:.3f}x "
          "(below 1 is better)")


if __name__ == "__main__":
    main()
