"""Dispatch throughput: full trial cycles through the HTTP API against Optuna by hand.

    python -m benchmarks.dispatch --database postgres --trials 1000

A real `clrsearch serve` process on a fresh database; simulated workers that train
nothing run claim, five reports (each answered with the pruner's decision) and complete,
the completion carrying the next claim as the real worker's does (`--claim-apart`:
claims in calls of their own, as before `claim_next`). The baselines, in the same run
and on the same kind of database: Optuna driven by hand with its RDB storage (ask,
report + should_prune per epoch, tell; TPE with Optuna 5's defaults, `MedianPruner()`,
the same five parameters and simulated losses), and the same with in-memory storage.

With one worker (the default) the three are interleaved in blocks of `--block` trials
(service, then RDB, then in-memory, over and over), so that the load other processes put
on the machine falls on all three alike; throughput over a window is its trial count
over the summed durations of its cycles. Blocks, not single trials: with `--ask-ahead`
the server drafts each study's next trial in a second process, and interleaving trial
by trial would let that work run for free while a baseline's trial is timed. With `--workers N`
the service runs first with N concurrent simulated workers (throughput from the
completion times), then the baselines.

The median pruner is asked at every report, on both sides, and prunes most trials of
a long study after one or two epochs (the output gives reports per trial); `--pruner
none` runs every trial's five epochs instead, issue 6's "ask, five reports, tell".

Goals (issue 6): service >= 2x RDB at the first 100 and at trials 900-1,000, and at
trials 900-1,000 within 1.5x of in-memory (ratio >= 0.67).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as common  # noqa: E402
from benchmarks._common import Cycle  # noqa: E402

RDB_GOAL = 2.0
MEMORY_GOAL = 1 / 1.5


def run_service_concurrently(server_url: str, n_trials: int, workers: int,
                             claim_apart: bool) -> list[Cycle]:
    """N simulated workers until the study has no trial left; cycles in completion order."""
    cycles: list[Cycle] = []
    lock = threading.Lock()
    failures: list[BaseException] = []

    def work(index: int) -> None:
        worker = common.SimulatedWorker(server_url, f"sim-{index}", claim_apart)
        try:
            while True:
                with lock:
                    if len(cycles) >= n_trials or failures:
                        return
                cycle = worker.cycle()
                if cycle is None:
                    time.sleep(worker.retry_after_s)
                    continue
                with lock:
                    cycles.append(cycle)
        except BaseException as error:  # reported by the main thread
            failures.append(error)
        finally:
            worker.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return sorted(cycles, key=lambda cycle: cycle.finished_at)


def concurrent_rate(cycles: list[Cycle], started: float, first: int, last: int) -> float:
    """Trials per second between the completions that bound a window."""
    begin = started if first == 0 else cycles[first - 1].finished_at
    return (last - first) / (cycles[last - 1].finished_at - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_options(parser, trials=200)
    parser.add_argument("--workers", type=int, default=1,
                        help="concurrent simulated workers on the service (default 1)")
    parser.add_argument("--block", type=int, default=50,
                        help="trials each side runs before the next takes over (default 50)")
    parser.add_argument("--pruner", choices=["median", "none"], default="median",
                        help="median: asked at every report (default); none: every trial "
                             "runs its five epochs")
    args = parser.parse_args()
    common.quiet_optuna()
    n = args.trials
    spans = common.windows(n)
    print(f"dispatch throughput, {args.database}, {n} trials, {args.workers} simulated "
          f"worker(s), pruner {args.pruner}; {common.machine()}")

    with common.workdir() as folder, \
            common.fresh_database(args.database, folder, args.postgres_url) as service_db, \
            common.fresh_database(args.database, folder, args.postgres_url) as baseline_db, \
            common.running_server(service_db, folder, claim_retry_s="0.01",
                                  **common.server_options(args)) as server:
        common.submit(server.url, common.study_spec("dispatch", n, max(1, args.workers),
                                                    pruner=args.pruner))
        rdb = common.HandDriven(baseline_db, pruner=args.pruner)
        memory = common.HandDriven(None, pruner=args.pruner)
        runs: dict[str, list[Cycle]] = {"service": [], "optuna-rdb": [], "optuna-memory": []}
        rates: dict[str, list[float]] = {}

        cpu_before = server.cpu_s()
        if args.workers == 1:
            worker = common.SimulatedWorker(server.url, "sim-0", args.claim_apart)
            for start in range(0, n, args.block):
                block = range(start, min(n, start + args.block))
                for index in block:
                    cycle = worker.cycle()
                    if cycle is None:
                        raise RuntimeError(f"the server had no trial to give at trial {index}")
                    runs["service"].append(cycle)
                runs["optuna-rdb"].extend(rdb.cycle() for _ in block)
                runs["optuna-memory"].extend(memory.cycle() for _ in block)
                print(f"  {block.stop} trials", file=sys.stderr, flush=True)
            worker.close()
            unseen = worker.unseen_trial
            for name, cycles in runs.items():
                rates[name] = [common.rate([c.total_s for c in cycles[a:b]]) for a, b in spans]
        else:
            started = time.perf_counter()
            runs["service"] = run_service_concurrently(server.url, n, args.workers,
                                                       args.claim_apart)
            rates["service"] = [concurrent_rate(runs["service"], started, a, b)
                                for a, b in spans]
            for name, hand in (("optuna-rdb", rdb), ("optuna-memory", memory)):
                runs[name] = [hand.cycle() for _ in range(n)]
                rates[name] = [common.rate([c.total_s for c in runs[name][a:b]])
                               for a, b in spans]
        server_cpu_ms = (server.cpu_s() - cpu_before) * 1000 / n
        if args.workers > 1:
            unseen = -1  # counted per thread; not gathered

    labels = [f"trials {a}-{b}" for a, b in spans]
    print()
    print(common.table(
        ["trials/s", *labels],
        [[name, *(f"{value:.1f}" for value in values)] for name, values in rates.items()],
    ))
    print()
    service = rates["service"]
    rows = [
        ["service / optuna-rdb", *(f"{s / r:.2f}x" for s, r in zip(service, rates["optuna-rdb"],
                                                                   strict=True)),
         f">= {RDB_GOAL:.1f}x"],
        ["service / optuna-memory",
         *(f"{s / m:.2f}x" for s, m in zip(service, rates["optuna-memory"], strict=True)),
         f">= {MEMORY_GOAL:.2f}x at the end"],
    ]
    print(common.table(["ratio", *labels, "goal"], rows))
    print()

    # Where the time of a cycle goes, per call, in the last window.
    a, b = spans[-1]
    rows = []
    for name, cycles in runs.items():
        window = cycles[a:b]
        reports = [s for c in window for s in c.report_s]
        rows.append([
            name, common.own_claims_ms(window),
            common.ms(common.percentile(reports, 50)),
            common.ms(common.percentile([c.complete_s for c in window], 50)),
            f"{sum(len(c.report_s) for c in window) / len(window):.2f}",
            f"{sum(c.pruned for c in window)}",
        ])
    print(f"median ms per call, trials {a}-{b} (claim = ask, complete = tell for Optuna; "
          "the service's complete carries the next claim unless --claim-apart):")
    print(common.table(["", "claim", "report", "complete", "reports/trial", "pruned"], rows))
    # The search itself: without ask-ahead the service's trials are plain Optuna's, trial
    # for trial. With it the search is another random draw of the same seed, and one
    # seed says little: `benchmarks.ask_ahead_search` compares several.
    rows = []
    for name, cycles in runs.items():
        values = [c.value for c in cycles if c.value is not None]
        rows.append([name, len(values), f"{min(values):.4f}" if values else "-",
                     f"{np.median(sorted(values)[:10]):.4f}" if values else "-"])
    print("\nsearch quality (simulated val_loss, lower is better):")
    print(common.table(["", "complete trials", "best", "median of the best 10"], rows))
    print(f"\nserver CPU (its process and the ask-ahead proposer): {server_cpu_ms:.1f} ms "
          "per trial")
    if unseen:
        print(f"{unseen} calls answered 404 for a trial just claimed (retried)")


if __name__ == "__main__":
    main()
