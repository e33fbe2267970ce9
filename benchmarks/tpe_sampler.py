"""The server's TPE against Optuna's, on the same study: ask time and the same suggestions.

    python -m benchmarks.tpe_sampler --trials 1000
    python -m benchmarks.tpe_sampler --trials 10000 --every 2500

Two in-memory studies driven by hand (`benchmarks._common.HandDriven`: ask, five
reports with the median pruner, tell), one with Optuna's `TPESampler(seed=0)` and one
with the server's `IncrementalTPESampler(seed=0)` (`service/tpe.py`), take turns in
blocks of 50 trials, so that load from elsewhere falls on both alike. Printed: the
median ask (the sampler's work for one trial) over the 50 trials that end at each
checkpoint, for each sampler, and their ratio. The run stops with an error if the two
studies' trials ever differ in parameters or state.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as common  # noqa: E402
from service.tpe import IncrementalTPESampler  # noqa: E402

BLOCK = 50


def checkpoints(n_trials: int, every: int) -> list[int]:
    marks = {100, n_trials} | set(range(every, n_trials + 1, every))
    return sorted(mark for mark in marks if BLOCK <= mark <= n_trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000, help="trials per study (1000)")
    parser.add_argument("--every", type=int, default=250,
                        help="a checkpoint every this many trials (250)")
    args = parser.parse_args()
    common.quiet_optuna()
    print(common.machine())
    optunas = common.HandDriven(None)
    ours = common.HandDriven(None)
    ours.study.sampler = IncrementalTPESampler(seed=0)
    marks = checkpoints(args.trials, args.every)
    asks: dict[str, list[float]] = {"optuna": [], "ours": []}
    rows = []
    for done in range(BLOCK, args.trials + 1, BLOCK):
        for name, driven in (("optuna", optunas), ("ours", ours)):
            asks[name].extend(driven.cycle().claim_s for _ in range(BLOCK))
        theirs_last = optunas.study.trials[-BLOCK:]
        ours_last = ours.study.trials[-BLOCK:]
        if [(t.params, t.state) for t in theirs_last] != [(t.params, t.state)
                                                          for t in ours_last]:
            raise SystemExit(f"the samplers' trials differ between trials {done - BLOCK} "
                             f"and {done}: the server's TPE is not Optuna's")
        if done in marks:
            theirs_ms = statistics.median(asks["optuna"][-BLOCK:]) * 1e3
            ours_ms = statistics.median(asks["ours"][-BLOCK:]) * 1e3
            rows.append([done, f"{theirs_ms:.2f}", f"{ours_ms:.2f}",
                         f"{ours_ms / theirs_ms:.2f}x"])
            print(f"  {done} trials", file=sys.stderr)
    print(common.table(["trials", "Optuna's TPE: ask ms", "server's TPE: ask ms",
                        "server / Optuna"], rows))
    print(f"same parameters and states in all {args.trials} trials")


if __name__ == "__main__":
    main()
