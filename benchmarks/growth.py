"""Growth: the server's cost per trial as a study grows, the sampler's own work aside.

    python -m benchmarks.growth --database postgres --trials 10000

A real `clrsearch serve` process on a fresh database; one simulated worker runs trial
cycles (claim, five reports with the median pruner's decision, complete) back to back.
The sampler is `random`, whose work per trial is constant, so what grows is the
server's: its SQL, Optuna's storage and the pruner. At each checkpoint (100, 300,
1,000, 3,000, 10,000 trials, up to `--trials`) the figures are taken over the 50
trials that end there: wall time of a cycle as the worker sees it, each call's median,
and the server process's CPU time per trial.

The baseline is the same run's figure at 100 trials. With `--optuna`, Optuna driven by
hand with RDB storage (random sampler, `MedianPruner()`) is interleaved trial by trial
on the same kind of database, to tell the service's growth from Optuna's own.

Goal (issue 6): cost per trial at 10,000 trials <= 3x its cost at 100 trials.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as common  # noqa: E402
from benchmarks._common import Cycle  # noqa: E402

CHECKPOINTS = (100, 300, 1000, 3000, 10000)
WINDOW = 50
GOAL = 3.0


def checkpoints(n_trials: int) -> list[int]:
    points = [point for point in CHECKPOINTS if point <= n_trials]
    return points if points and points[-1] == n_trials else [*points, n_trials]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_options(parser, trials=1000)
    parser.add_argument("--optuna", action="store_true",
                        help="interleave Optuna by hand with RDB storage, for comparison")
    args = parser.parse_args()
    common.quiet_optuna()
    n = args.trials
    points = checkpoints(n)
    print(f"growth, {args.database}, {n} trials, random sampler, median pruner; "
          f"{common.machine()}")

    cycles: list[Cycle] = []
    cpu_s: list[float] = []
    hand: list[Cycle] = []
    with common.workdir() as folder, \
            common.fresh_database(args.database, folder, args.postgres_url) as service_db, \
            common.fresh_database(args.database, folder, args.postgres_url) as baseline_db, \
            common.running_server(service_db, folder, **common.server_options(args)) as server:
        common.submit(server.url, common.study_spec("growth", n, 1, sampler="random"))
        rdb = common.HandDriven(baseline_db, sampler="random") if args.optuna else None
        worker = common.SimulatedWorker(server.url, "sim-0")
        cpu_s.append(server.cpu_s())
        for index in range(n):
            cycle = worker.cycle()
            if cycle is None:
                raise RuntimeError(f"the server had no trial to give at trial {index}")
            cycles.append(cycle)
            cpu_s.append(server.cpu_s())
            if rdb is not None:
                hand.append(rdb.cycle())
            if (index + 1) in points:
                print(f"  {index + 1} trials", file=sys.stderr, flush=True)
        worker.close()

    rows = []
    base: dict[str, float] = {}
    for point in points:
        start = max(0, point - min(WINDOW, point // 2))
        window = cycles[start:point]
        figures = {
            "cycle": sum(c.total_s for c in window) / len(window),
            "cpu": (cpu_s[point] - cpu_s[start]) / len(window),
        }
        if hand:
            figures["optuna"] = sum(c.total_s for c in hand[start:point]) / len(window)
        base = base or figures
        reports = [s for c in window for s in c.report_s]
        row = [
            point, common.ms(figures["cycle"]), f"{figures['cycle'] / base['cycle']:.2f}x",
            common.ms(figures["cpu"]), f"{figures['cpu'] / base['cpu']:.2f}x",
            common.ms(common.percentile([c.claim_s for c in window], 50)),
            common.ms(common.percentile(reports, 50)),
            common.ms(common.percentile([c.complete_s for c in window], 50)),
        ]
        if hand:
            row += [common.ms(figures["optuna"]),
                    f"{figures['optuna'] / base['optuna']:.2f}x"]
        rows.append(row)
    header = ["trials", "ms/trial", "vs 100", "server CPU ms/trial", "vs 100",
              "claim p50", "report p50", "complete p50"]
    if hand:
        header += ["optuna-rdb ms/trial", "vs 100"]
    print()
    print(common.table(header, rows))
    print(f"\nms per trial over the {WINDOW} trials ending at each checkpoint; goal: "
          f"<= {GOAL:.0f}x the 100-trial figure at 10,000 trials")
    if worker.unseen_trial:
        print(f"{worker.unseen_trial} calls answered 404 for a trial just claimed (retried)")


if __name__ == "__main__":
    main()
