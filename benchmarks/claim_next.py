"""What carrying the next claim with each completion (`claim_next`) saves, in one run.

    python -m benchmarks.claim_next --database sqlite --trials 1000
    python -m benchmarks.claim_next --database postgres --trials 1000

One `clrsearch serve` process on a fresh database and one study (TPE, median pruner,
the dispatch benchmark's five parameters and simulated losses, parallelism 2). Two
simulated workers take turns on it in blocks of `--block` trials: one sends its claims
with its completions, as `worker.loop` does; the other claims in calls of its own, as
workers did before `claim_next`. Both see the study at the same sizes and the same load
from elsewhere, so the ratio of their trial times is the saving itself. Parallelism 2,
because the worker whose block ends holds the trial its last completion claimed while
the other takes its turn.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_options(parser, trials=1000)
    parser.add_argument("--block", type=int, default=25,
                        help="trials each worker runs before the other takes over (25)")
    args = parser.parse_args()
    common.quiet_optuna()
    print(f"claim with the completion or apart, {args.database}, {args.trials} trials; "
          f"{common.machine()}")
    # Per worker and trial, in the order they ran: the whole cycle, and the calls
    # between its last report and the next trial's first (claim and completion, or the
    # completion with the next claim), which leave out how many reports a trial made.
    times: dict[str, list[float]] = {"with the completion": [], "apart": []}
    handovers: dict[str, list[float]] = {"with the completion": [], "apart": []}
    with common.workdir() as folder, \
            common.fresh_database(args.database, folder, args.postgres_url) as database, \
            common.running_server(database, folder, claim_retry_s="0.01",
                                  **common.server_options(args)) as server:
        common.submit(server.url, common.study_spec("claim-next", args.trials, 2))
        workers = {
            "with the completion": common.SimulatedWorker(server.url, "sim-merged"),
            "apart": common.SimulatedWorker(server.url, "sim-apart", claim_apart=True),
        }
        done = 0
        while done < args.trials:
            for name, worker in workers.items():
                for _ in range(args.block):
                    cycle = worker.cycle()
                    if cycle is None:
                        break
                    times[name].append(cycle.total_s)
                    handovers[name].append(cycle.claim_s + cycle.complete_s)
                    done += 1
            print(f"  {done} trials", file=sys.stderr, flush=True)
        for worker in workers.values():
            worker.close()

    # Windows by each worker's own trial count: at the start and at the end of the study.
    n = min(len(values) for values in times.values())
    width = min(100, n // 2)
    rows = []
    for label, (a, b) in (("first", (0, width)), ("last", (n - width, n))):
        for what, series in (("trial, mean", times), ("claim + complete, median", handovers)):
            pick = statistics.fmean if what.endswith("mean") else statistics.median
            merged = pick(series["with the completion"][a:b]) * 1000
            apart = pick(series["apart"][a:b]) * 1000
            rows.append([f"{what}, {label} {width} of each", f"{apart:.2f}", f"{merged:.2f}",
                         f"{merged / apart:.2f}x"])
    print()
    print(common.table(["ms", "claim apart", "claim with the completion", "with / apart"],
                       rows))


if __name__ == "__main__":
    main()
