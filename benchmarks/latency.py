"""Latency under load: 64 concurrent simulated workers against one server on PostgreSQL.

    python -m benchmarks.latency --trials 1000

A real `clrsearch serve` process on a fresh PostgreSQL database and a study whose
parallelism equals the number of workers (TPE, median pruner asked every epoch). Each
simulated worker claims, "trains" for `--epoch-s` seconds per epoch (uniformly 0.5x to
1.5x, so that workers drift apart as real ones do; 0 hammers the server), reports each
epoch and follows the pruner's answer, and completes, the completion carrying the next
claim as the real worker's does (`--claim-apart`: claims of their own); such a call is
timed as a claim, and "complete" times only the completions that carried none. The first
claims are spread over `--stagger-s` (one epoch by default): with `--stagger-s 0` all 64
claim at once and that first burst queues for the journal's lock (claim p99 about 0.5 s
over 300 trials at `5cbc25c`; the claims after it as usual). The latency of a call is
measured by the client, from sending the request to reading the answer: it includes
HTTP, the server's queueing, and this process's own event loop, which shares the two
cores. A call answered 5xx or timed out is retried after a pause, as a worker would, and
counted; the percentiles time the try that succeeded.

The baseline, in the same run: one worker alone against the same server and the same
study once the loaded phase is over, so the ratio shows what the load itself costs.

Goals (issue 6): p99 of a report (with its pruning decision) < 50 ms, of a claim < 250 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as common  # noqa: E402

RETRIES_AFTER_SERVER_ERROR = 10
# Longer than the server's own 30 s wait for a pooled connection, so that its 500 for an
# exhausted pool arrives first; a call that takes this long counts as a timeout.
CALL_TIMEOUT_S = 60
REPORT_GOAL_S = 0.050
CLAIM_GOAL_S = 0.250


@dataclass
class Load:
    """What the simulated workers share: how many trials they may still take, timings."""

    trials: int
    reserved: int = 0
    claims: list[tuple[int, float]] = field(default_factory=list)
    empty_claims: list[float] = field(default_factory=list)
    reports: list[tuple[int, float]] = field(default_factory=list)
    completes: list[float] = field(default_factory=list)
    unseen_trial: int = 0
    server_errors: collections.Counter[str] = field(default_factory=collections.Counter)


async def simulated_worker(client: httpx.AsyncClient, index: int, load: Load,
                           epoch_s: float, stagger_s: float, claim_apart: bool) -> None:
    jitter = random.Random(index)
    # A fleet started at one instant sends every claim at once; see `--stagger-s`.
    await asyncio.sleep(jitter.uniform(0, stagger_s))
    claim = {"worker_id": f"sim-{index}", "device": "sim"}
    # The answer to the claim that went with the last completion, and how long that
    # completion with its claim took.
    claimed: tuple[dict, float] | None = None
    while claimed is not None or load.reserved < load.trials:
        if claimed is None:
            # Reserved before the await, so that no more than `trials` are claimed in all.
            load.reserved += 1
            sent = time.perf_counter()
            answer = await post(client, "/claim", claim, load)
            took = time.perf_counter() - sent
        else:
            (answer, took), claimed = claimed, None
        trial = answer["trial"]
        if trial is None:
            load.reserved -= 1
            load.empty_claims.append(took)
            await asyncio.sleep(answer["retry_after_s"])
            continue
        load.claims.append((trial["number"], took))
        path = f"/trials/{trial['trial_id']}"
        pruned = False
        for epoch, loss in enumerate(common.simulated_losses(trial["params"], trial["number"]),
                                     1):
            await asyncio.sleep(epoch_s * jitter.uniform(0.5, 1.5))
            sent = time.perf_counter()
            decision = await post(client, f"{path}/report",
                                  common.report_body(trial["lease_id"], epoch, loss), load)
            load.reports.append((trial["number"], time.perf_counter() - sent))
            if decision["action"] != "continue":
                pruned = decision["action"] == "prune"
                break
        body = {"lease_id": trial["lease_id"], "value": loss, "pruned": pruned}
        if not claim_apart and load.reserved < load.trials:
            load.reserved += 1
            body["claim_next"] = claim  # as worker.loop does; timed as a claim
        sent = time.perf_counter()
        acked = await post(client, f"{path}/complete", body, load)
        took = time.perf_counter() - sent
        if "claim_next" in body:
            claimed = (acked["next"], took)
        else:
            load.completes.append(took)


async def post(client: httpx.AsyncClient, path: str, body: dict, load: Load) -> dict:
    """One call as the worker makes it: 5xx answers are retried after a pause (counted,
    and their time is not in the percentiles, which time the last try)."""
    for _ in range(RETRIES_AFTER_SERVER_ERROR):
        try:
            response = await client.post(path, json=body)
        except httpx.TimeoutException:
            load.server_errors[f"{path.rpartition('/')[2]} timeout"] += 1
            continue
        for _ in range(common.RETRIES_AFTER_UNSEEN_TRIAL):
            if response.status_code != 404:
                break
            # Answered before its commit: see `common.SimulatedWorker._post`.
            load.unseen_trial += 1
            await asyncio.sleep(0.01)
            response = await client.post(path, json=body)
        if response.status_code < 500:
            break
        load.server_errors[f"{path.rpartition('/')[2]} {response.status_code}"] += 1
        await asyncio.sleep(1.0)
    if response.status_code != 200:
        raise RuntimeError(f"{path} answered {response.status_code}: {response.text}")
    return response.json()


async def run_load(server_url: str, workers: int, load: Load, epoch_s: float,
                   stagger_s: float, claim_apart: bool) -> None:
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    async with httpx.AsyncClient(base_url=f"{server_url}/api/v1/worker",
                                 timeout=CALL_TIMEOUT_S, limits=limits) as client:
        await asyncio.gather(*(simulated_worker(client, i, load, epoch_s, stagger_s,
                                                claim_apart) for i in range(workers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_options(parser, trials=300)
    parser.set_defaults(database="postgres")
    parser.add_argument("--workers", type=int, default=64, help="simulated workers (64)")
    parser.add_argument("--epoch-s", type=float, default=5.0,
                        help="simulated training time per epoch, seconds (5; at 1 the "
                             "server is overloaded today)")
    parser.add_argument("--stagger-s", type=float, default=None,
                        help="spread the workers' first claims over this many seconds "
                             "(default: one epoch; 0 starts them all at once)")
    parser.add_argument("--alone", type=int, default=30,
                        help="trials run by one worker alone afterwards, the baseline (30)")
    args = parser.parse_args()
    common.quiet_optuna()
    print(f"latency under load, {args.database}, {args.trials} trials, {args.workers} "
          f"simulated workers, {args.epoch_s} s per epoch, first claims spread over "
          f"{args.epoch_s if args.stagger_s is None else args.stagger_s} s; "
          f"{common.machine()}")

    load = Load(trials=args.trials)
    with common.workdir() as folder, \
            common.fresh_database(args.database, folder, args.postgres_url) as database, \
            common.running_server(database, folder, claim_retry_s="0.05",
                                  **common.server_options(args)) as server:
        # Room for the lone worker after the loaded phase, which stops at `trials`.
        spec = common.study_spec("latency", args.trials + args.alone, args.workers)
        common.submit(server.url, spec)
        cpu_before, started = server.cpu_s(), time.perf_counter()
        stagger_s = args.epoch_s if args.stagger_s is None else args.stagger_s
        asyncio.run(run_load(server.url, args.workers, load, args.epoch_s, stagger_s,
                             args.claim_apart))
        wall_s = time.perf_counter() - started
        server_busy = (server.cpu_s() - cpu_before) / wall_s

        alone = common.SimulatedWorker(server.url, "alone", args.claim_apart)
        lone_cycles = [alone.cycle() for _ in range(args.alone)]
        alone.close()
    lone = [cycle for cycle in lone_cycles if cycle is not None]
    unseen = load.unseen_trial + alone.unseen_trial

    claims = [took for _, took in load.claims]
    reports = [took for _, took in load.reports]
    late = args.trials * 3 // 4
    late_claims = [took for number, took in load.claims if number >= late]
    late_reports = [took for number, took in load.reports if number >= late]
    # Timed as the loaded workers' claims are: with the completion that carried them.
    lone_claims = [cycle.claim_s if args.claim_apart else cycle.complete_s
                   for cycle in lone]
    lone_reports = [s for cycle in lone for s in cycle.report_s]

    def row(name: str, values: list[float]) -> list[str]:
        return [name, str(len(values)), common.ms(common.percentile(values, 50)),
                common.ms(common.percentile(values, 99)), common.ms(max(values, default=0))]

    print(f"\nloaded phase: {len(load.claims)} trials in {wall_s:.1f} s "
          f"({len(load.claims) / wall_s:.1f} trials/s), server process busy "
          f"{server_busy * 100:.0f}% of one core; {len(load.empty_claims)} empty claims; "
          f"{unseen} calls answered 404 for a trial just claimed (retried)")
    if load.server_errors:
        print(f"server errors, retried after 1 s: {dict(load.server_errors)}")
    print(common.table(["ms", "calls", "p50", "p99", "max"], [
        row("report, loaded", reports),
        row(f"report, loaded, trials {late}+", late_reports),
        row("report, alone (baseline)", lone_reports),
        row("claim, loaded", claims),
        row(f"claim, loaded, trials {late}+", late_claims),
        row("claim, alone (baseline)", lone_claims),
        row("complete, loaded", load.completes),
    ]))
    p99_report, p99_claim = common.percentile(reports, 99), common.percentile(claims, 99)
    print()
    print(common.table(["p99", "loaded", "loaded / alone", "goal", "loaded / goal"], [
        ["report", common.ms(p99_report),
         f"{p99_report / common.percentile(lone_reports, 99):.1f}x",
         common.ms(REPORT_GOAL_S), f"{p99_report / REPORT_GOAL_S:.2f}x"],
        ["claim", common.ms(p99_claim),
         f"{p99_claim / common.percentile(lone_claims, 99):.1f}x",
         common.ms(CLAIM_GOAL_S), f"{p99_claim / CLAIM_GOAL_S:.2f}x"],
    ]))


if __name__ == "__main__":
    main()
