"""Where the server's time goes on the worker protocol: sampled stacks and SQL statements.

    python -m benchmarks.profile_server --database postgres --trials 600 --profiled 200

Two views of the same trial cycle (claim, five reports with the pruner's decision,
complete; TPE, median pruner asked every epoch), run by one simulated worker:

1. Sampled stacks of a real `clrsearch serve` process, with py-spy (`pip install
   py-spy`), over the last `--profiled` trials of a study of `--trials`. Idle threads
   are sampled too (`--idle`), so time spent waiting for the database shows up; a
   sample counts as request work when its thread is running an endpoint. Each sample
   is charged to the innermost frame that belongs to a known package ("self time by
   package"), and to every operation of ours on its stack ("inclusive").
2. SQL statements and commits per call, counted in process (FastAPI's TestClient on the
   same kind of database) with SQLAlchemy engine events, split between our tables and
   Optuna's journal (its table and its lock), over `--counted` trials after the same
   warm-up. Commits are shared: the journal is written in our transaction.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as common  # noqa: E402

# Innermost match wins: a sample in psycopg called from SQLAlchemy called from Optuna's
# storage is the driver's.
PACKAGES = [
    ("database driver (C calls, waiting for the database)",
     ("/psycopg/", "/psycopg_binary/", "/sqlite3/", "psycopg_binary")),
    ("SQLAlchemy (Python side)", ("/sqlalchemy/",)),
    ("Optuna samplers (TPE)", ("/optuna/samplers/", "/optuna/distributions")),
    ("Optuna pruners", ("/optuna/pruners/",)),
    ("Optuna storages (Python side)", ("/optuna/storages/",)),
    ("Optuna, other", ("/optuna/",)),
    ("numpy / scipy", ("/numpy/", "/scipy/")),
    ("pydantic", ("/pydantic/", "/pydantic_core/")),
    ("json", ("/json/",)),
    ("logging", ("/logging/",)),
    ("clrsearch service", ("/service/",)),
    ("clrsearch shared (spec, protocol)", ("/clrsearch/",)),
    ("FastAPI / Starlette", ("/fastapi/", "/starlette/")),
    ("anyio thread pool", ("/anyio/",)),
    ("uvicorn / h11 / httptools", ("/uvicorn/", "/h11/", "/httptools/")),
    ("asyncio", ("/asyncio/",)),
]
# SQLAlchemy's calls into the DB-API driver: a sample ending there waits for the driver.
DRIVER_CALLS = {"do_execute", "do_executemany", "do_execute_no_params", "do_commit",
                "do_rollback", "do_close", "do_begin", "connect"}
# Our operations, charged inclusively: (label, function, file fragment).
OPERATIONS = [
    ("route: claim", "claim", "/service/api.py"),
    ("route: report", "report", "/service/api.py"),
    ("route: complete", "complete", "/service/api.py"),
    ("claiming (on its own or with a completion)", "_claim_sampling", "/service/api.py"),
    ("bridge.ask (Optuna ask + suggest)", "ask", "/service/optuna_bridge.py"),
    ("bridge.report (report + should_prune)", "report", "/service/optuna_bridge.py"),
    ("bridge.tell", "tell", "/service/optuna_bridge.py"),
    ("bridge._study (study lookup)", "_study", "/service/optuna_bridge.py"),
    ("domain.sweep_lapsed_leases", "sweep_lapsed_leases", "/service/domain.py"),
    ("domain._counts_by_study", "_counts_by_study", "/service/domain.py"),
    ("domain._complete_study_if_done", "_complete_study_if_done", "/service/domain.py"),
    ("domain._spec (StudySpec re-validation)", "_spec", "/service/domain.py"),
    ("domain._assignment", "_assignment", "/service/domain.py"),
    ("domain._touch_worker", "_touch_worker", "/service/domain.py"),
    ("db.db_now (clock query)", "db_now", "/service/db.py"),
    ("db.unit_of_work (commit, close)", "unit_of_work", "/service/db.py"),
    ("Optuna TPE sample_relative", "sample_relative", "/optuna/samplers/_tpe/"),
    ("Optuna pruner.prune", "prune", "/optuna/pruners/"),
    ("Optuna _CachedStorage", "", "/optuna/storages/_cached_storage.py"),
    ("Optuna RDBStorage", "", "/optuna/storages/_rdb/storage.py"),
    ("Optuna JournalStorage", "", "/optuna/storages/journal/"),
    ("bridge.lock_journal (the journal's lock)", "lock_journal", "/service/optuna_bridge.py"),
    ("journal read_logs (first read of a transaction)", "read_logs",
     "/service/optuna_bridge.py"),
    ("journal flush (one INSERT per call)", "flush", "/service/optuna_bridge.py"),
]
# Transaction control, listed per call but not counted as statements (SQLite's engines
# send an explicit BEGIN; psycopg's does not).
CONTROL = {"BEGIN", "COMMIT"}
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*):\d+\)$")


def parse_raw(path: Path) -> Iterator[tuple[list[tuple[str, str]], int]]:
    """py-spy's raw (collapsed) output: each line a stack, root first, and its count."""
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = []
        for part in stack.split(";")[1:]:
            match = FRAME.match(part)
            if match:
                frames.append((match["function"], match["file"]))
        yield frames, int(count)


def package_of(frames: list[tuple[str, str]]) -> str:
    if frames and "/sqlalchemy/engine/default.py" in frames[-1][1] and \
            frames[-1][0].rpartition(".")[2] in DRIVER_CALLS:
        # The DB-API call itself is C (sqlite3) with no frame of its own.
        return PACKAGES[0][0]
    for _function, file in reversed(frames):
        for label, fragments in PACKAGES:
            if any(fragment in file for fragment in fragments):
                return label
    return "other"


def _named(qualified: str, function: str) -> bool:
    """py-spy names methods with their class: `OptunaBridge.ask`."""
    return qualified == function or qualified.endswith("." + function)


def summarise_stacks(path: Path) -> None:
    request: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    loop_busy: collections.Counter[str] = collections.Counter()
    loop_idle = request_total = 0
    for frames, count in parse_raw(path):
        files = [file for _, file in frames]
        if any("/service/api.py" in file for file in files) or any(
                "/service/app.py" in file and function == "_sweep_once"
                for function, file in frames):
            request_total += count
            request[package_of(frames)] += count
            for label, function, fragment in OPERATIONS:
                if any(fragment in file and (not function or _named(name, function))
                       for name, file in frames):
                    inclusive[label] += count
        elif any("/asyncio/" in file for file in files):
            if frames and _named(frames[-1][0], "select") and "selectors" in frames[-1][1]:
                loop_idle += count
            else:
                loop_busy[package_of(frames)] += count
    if not request_total:
        print("no samples of request work: is py-spy allowed to read the process?")
        return
    print(f"\nrequest threads: {request_total} samples (100 per second per thread); "
          "self time by package:")
    print(common.table(["package", "share"], [
        [label, f"{count / request_total * 100:.1f}%"]
        for label, count in request.most_common()
    ]))
    print("\ninclusive share of request samples (an operation counts every sample under it):")
    print(common.table(["operation", "share"], [
        [label, f"{inclusive[label] / request_total * 100:.1f}%"]
        for label, _, _ in OPERATIONS
    ]))
    busy = sum(loop_busy.values())
    print(f"\nevent loop thread: {busy} busy samples ({busy / request_total * 100:.0f}% of the "
          f"request samples), {loop_idle} idle; busy by package:")
    print(common.table(["package", "share of busy"], [
        [label, f"{count / max(busy, 1) * 100:.1f}%"] for label, count in loop_busy.most_common(6)
    ]))


@contextmanager
def py_spy(pid: int, output: Path) -> Iterator[bool]:
    """Sample `pid` with py-spy until the block ends; yields whether it is running."""
    executable = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(executable).exists():
        print("py-spy is not installed (pip install py-spy): no sampled stacks")
        yield False
        return
    process = subprocess.Popen(
        [executable, "record", "--pid", str(pid), "--format", "raw", "--idle", "--threads",
         "--full-filenames", "--nonblocking", "--rate", "100", "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(1.0)
    try:
        yield process.poll() is None
    finally:
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=60)
        if not output.exists():
            print(f"py-spy wrote nothing: {errors.decode(errors='replace')[-500:]}")


def sample_server(args: argparse.Namespace) -> None:
    with common.workdir() as folder, \
            common.fresh_database(args.database, folder, args.postgres_url) as database, \
            common.running_server(database, folder, **common.server_options(args)) as server:
        common.submit(server.url, common.study_spec("profile", args.trials, 1,
                                                    sampler=args.sampler))
        worker = common.SimulatedWorker(server.url, "sim-0", args.claim_apart)
        for _ in range(args.trials - args.profiled):
            worker.cycle()
        raw = folder / "stacks.txt"
        with py_spy(server.pid, raw) as running:
            started = time.perf_counter()
            cycles = [worker.cycle() for _ in range(args.profiled)] if running else []
            wall_s = time.perf_counter() - started
        worker.close()
        if cycles:
            print(f"\nsampled trials {args.trials - args.profiled}-{args.trials}: "
                  f"{len(cycles) / wall_s:.1f} trials/s under the profiler")
        if raw.exists():
            summarise_stacks(raw)
            if args.keep_stacks:
                shutil.copy(raw, args.keep_stacks)


def count_statements(args: argparse.Namespace) -> None:
    import warnings

    from sqlalchemy import Engine, event

    with warnings.catch_warnings():
        # Starlette's TestClient asks for httpx2; irrelevant to what is counted here.
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import ServerSettings

    with common.workdir() as folder, \
            common.fresh_database(args.database, folder, args.postgres_url) as database:
        counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        current = {"call": "set-up"}
        engines: dict[int, str] = {}

        def on_execute(connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
            owner = engines.get(id(connection.engine), "optuna")
            if "optuna_journal" in statement or "pg_advisory_xact_lock" in statement:
                owner = "optuna"  # the journal, written through our own connection
            verb = statement.lstrip().split(None, 1)[0].upper()
            counts[(current["call"], owner, verb)] += 1

        def on_commit(connection: Any) -> None:
            owner = engines.get(id(connection.engine), "optuna")
            counts[(current["call"], owner, "COMMIT")] += 1

        event.listen(Engine, "before_cursor_execute", on_execute)
        event.listen(Engine, "commit", on_commit)
        try:
            settings = ServerSettings(database_url=database)
            with TestClient(create_app(settings)) as client:
                # Statements on any other engine, or on the journal's table, are Optuna's.
                engines[id(client.app.state.sessions.kw["bind"])] = "ours"
                worker = _InProcessWorker(client, current)
                client.post("/api/v1/studies", json=common.study_spec(
                    "count", args.warm_up + args.counted, 1, sampler=args.sampler),
                ).raise_for_status()
                for _ in range(args.warm_up):
                    worker.cycle()
                counts.clear()
                calls: collections.Counter[str] = collections.Counter()
                for _ in range(args.counted):
                    for call in worker.cycle():
                        calls[call] += 1
        finally:
            event.remove(Engine, "before_cursor_execute", on_execute)
            event.remove(Engine, "commit", on_commit)

    print(f"\nSQL per call over {args.counted} trials after {args.warm_up} "
          f"({args.database}; ours / Optuna's engine):")
    rows = []
    for call in ("claim", "report", "complete"):
        per_call = {}
        for owner in ("ours", "optuna"):
            verbs = {verb: n for (c, o, verb), n in counts.items() if c == call and o == owner}
            per_call[owner] = verbs
        def text(verbs: dict[str, int], n: int = calls[call]) -> str:
            statements = sum(v for k, v in verbs.items() if k not in CONTROL) / max(n, 1)
            detail = ", ".join(f"{k} {v / max(n, 1):.1f}" for k, v in sorted(verbs.items()))
            return f"{statements:.1f} ({detail})"
        rows.append([call, calls[call], text(per_call["ours"]), text(per_call["optuna"])])
    print(common.table(["call", "calls", "ours per call", "Optuna's per call"], rows))
    total = sum(n for (c, _, verb), n in counts.items() if verb not in CONTROL)
    commits = sum(n for (_, _, verb), n in counts.items() if verb == "COMMIT")
    print(f"per trial: {total / args.counted:.1f} statements, {commits / args.counted:.1f} "
          "commits")


class _InProcessWorker:
    """`common.SimulatedWorker` over the TestClient, naming the call being counted."""

    def __init__(self, client: Any, current: dict[str, str]) -> None:
        self.client = client
        self.current = current

    def _post(self, call: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.current["call"] = call
        response = self.client.post(f"/api/v1/worker{path}", json=body)
        response.raise_for_status()
        return response.json()

    def cycle(self) -> list[str]:
        trial = self._post("claim", "/claim", {"worker_id": "sim-0"})["trial"]
        calls = ["claim"]
        path = f"/trials/{trial['trial_id']}"
        pruned = False
        for epoch, loss in enumerate(common.simulated_losses(trial["params"], trial["number"]),
                                     1):
            decision = self._post("report", f"{path}/report",
                                  common.report_body(trial["lease_id"], epoch, loss))
            calls.append("report")
            if decision["action"] != "continue":
                pruned = True
                break
        self._post("complete", f"{path}/complete",
                   {"lease_id": trial["lease_id"], "value": loss, "pruned": pruned})
        self.current["call"] = "between"
        return [*calls, "complete"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_options(parser, trials=300)
    parser.add_argument("--profiled", type=int, default=150,
                        help="trials sampled at the end of the study (150)")
    parser.add_argument("--warm-up", type=int, default=100,
                        help="trials before the statements are counted (100)")
    parser.add_argument("--counted", type=int, default=30, help="trials counted (30)")
    parser.add_argument("--sampler", choices=["tpe", "random"], default="tpe",
                        help="the study's sampler; random keeps the sampler's work constant "
                             "as the study grows, as benchmarks.growth does (tpe)")
    parser.add_argument("--keep-stacks", type=Path, help="copy py-spy's raw stacks here")
    args = parser.parse_args()
    common.quiet_optuna()
    print(f"server profile, {args.database}; {common.machine()}")
    count_statements(args)
    sample_server(args)


if __name__ == "__main__":
    main()
