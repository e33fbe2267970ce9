"""Growth: the server's cost per trial as a study grows, the sampler's own work aside.

    python -m benchmarks.growth --database postgres --trials 10000

A real `clrsearch serve` process on a fresh database; one simulated worker runs trial
cycles (reports with the median pruner's decisions, then the completion, which carries
the next claim; `--claim-apart`: claims of their own) back to back.
The sampler is `random`, whose work per trial is constant, so what grows is the
server's: its SQL, Optuna's storage and the pruner. At each checkpoint (100, 300,
1,000, 3,000, 10,000 trials, up to `--trials`) the figures are taken over the 50
trials that end there: wall time of a cycle as the worker sees it, each call's median,
and the server process's CPU time per trial.

The baseline is the figure at 100 trials, taken twice in the same run: at the start of
the study, and again, after the study, on a second study of 100 trials run by the same
server (whose first study's trials stay in its memory and database). Ratios are to the
mean of the two, which cancels a machine that slows down or speeds up steadily during
the run; on this project's shared machine one 100-trial figure alone moved the 10,000
ratio between 1.3x and 3.4x. With `--optuna`, Optuna driven by hand with RDB storage
(random sampler, `MedianPruner()`) is interleaved trial by trial on the same kind of
database, to tell the service's growth from Optuna's own (its baseline: its first 100).

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
        worker = common.SimulatedWorker(server.url, "sim-0", args.claim_apart)
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
        # The baseline again, now: a second study's first 100 trials, same server.
        again_n = min(CHECKPOINTS[0], n)
        common.submit(server.url, common.study_spec("growth-again", again_n, 1,
                                                    sampler="random"))
        again: list[Cycle] = []
        again_cpu_s = [server.cpu_s()]
        for index in range(again_n):
            cycle = worker.cycle()
            if cycle is None:
                raise RuntimeError(f"the server had no trial to give at trial {index} of "
                                   "the second study")
            again.append(cycle)
            again_cpu_s.append(server.cpu_s())
        worker.close()

    def measure(runs: list[Cycle], cpu: list[float], point: int,
                hand_runs: list[Cycle]) -> tuple[dict[str, float], list[Cycle]]:
        start = max(0, point - min(WINDOW, point // 2))
        window = runs[start:point]
        figures = {
            "cycle": sum(c.total_s for c in window) / len(window),
            "cpu": (cpu[point] - cpu[start]) / len(window),
        }
        if hand_runs:
            figures["optuna"] = sum(c.total_s for c in hand_runs[start:point]) / len(window)
        return figures, window

    first, _ = measure(cycles, cpu_s, points[0], hand)
    last, _ = measure(again, again_cpu_s, again_n, [])
    base = {key: (first[key] + last[key]) / 2 for key in ("cycle", "cpu")}
    if hand:
        base["optuna"] = first["optuna"]
    rows = []
    labelled = [(point, cycles, cpu_s, hand, str(point)) for point in points]
    labelled.append((again_n, again, again_cpu_s, [], f"{again_n}, again (2nd study)"))
    for point, runs, cpu, hand_runs, label in labelled:
        figures, window = measure(runs, cpu, point, hand_runs)
        reports = [s for c in window for s in c.report_s]
        row = [
            label, common.ms(figures["cycle"]), f"{figures['cycle'] / base['cycle']:.2f}x",
            common.ms(figures["cpu"]), f"{figures['cpu'] / base['cpu']:.2f}x",
            common.own_claims_ms(window),
            common.ms(common.percentile(reports, 50)),
            common.ms(common.percentile([c.complete_s for c in window], 50)),
        ]
        if hand:
            row += ([common.ms(figures["optuna"]),
                     f"{figures['optuna'] / base['optuna']:.2f}x"] if hand_runs else ["", ""])
        rows.append(row)
    header = ["trials", "ms/trial", "vs 100 (mean of both)", "server CPU ms/trial", "vs 100",
              "claim p50 (own calls)", "report p50", "complete p50 (+ next claim)"]
    if hand:
        header += ["optuna-rdb ms/trial", "vs 100"]
    print()
    print(common.table(header, rows))
    print(f"\nms per trial over the {WINDOW} trials ending at each checkpoint; ratios to the "
          f"mean of the two 100-trial figures; goal: <= {GOAL:.0f}x at 10,000 trials")
    if worker.unseen_trial:
        print(f"{worker.unseen_trial} calls answered 404 for a trial just claimed (retried)")


if __name__ == "__main__":
    main()
