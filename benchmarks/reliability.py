"""Reliability figures: run the fault-injection tests and tabulate what they report.

    python -m benchmarks.reliability              # each fault once
    python -m benchmarks.reliability --repeat 3   # each fault three times

Each test injects one fault into a real study (real `clrsearch serve` and `clrsearch
worker` processes), asserts that nothing was lost, stuck or recorded twice, and prints
one `reliability summary` line with its figures (`tests/integration/faults.py`). This
runs them one after the other, collects those lines with each run's wall time, and
prints the table of `docs/reliability.md`. It exits with 1 when any run failed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAULTS = {
    "worker SIGKILL": "tests/integration/test_worker_crash.py::"
                      "test_worker_killed_mid_trial_is_retried_and_resumes_with_the_same_schedule",
    "worker SIGTERM": "tests/integration/test_worker_crash.py::"
                      "test_worker_stopped_with_sigterm_hands_its_trial_back_and_the_next_one_"
                      "resumes_it",
    "server SIGKILL and restart": "tests/integration/test_server_restart.py",
    "PostgreSQL crash and restart": "tests/integration/test_postgres_restart.py",
}
SUMMARY = re.compile(r"^reliability summary (?P<fault>[^:]+): (?P<figures>\{.*\})$", re.M)
COLUMNS = ("trials", "attempts", "retried", "resumed", "spooled_delivered", "dropped", "lost")


def run(test: str) -> tuple[dict[str, dict], float, bool, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", test],
        cwd=ROOT, capture_output=True, text=True,
    )
    seconds = time.perf_counter() - started
    found = {match["fault"]: json.loads(match["figures"])
             for match in SUMMARY.finditer(done.stdout)}
    return found, seconds, done.returncode == 0, done.stdout[-3000:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each fault")
    args = parser.parse_args()

    header = ["fault", "run", "seconds", *COLUMNS, "final states"]
    rows = []
    failed = False
    for fault, test in FAULTS.items():
        for index in range(1, args.repeat + 1):
            found, seconds, passed, tail = run(test)
            figures = found.get(fault)
            if passed and figures is None:
                print(f"{fault}, run {index}: skipped\n{tail}", file=sys.stderr)
                continue
            if not passed or figures is None:
                failed = True
                print(f"{fault}, run {index}: FAILED\n{tail}", file=sys.stderr)
                continue
            states = ", ".join(f"{count} {state}" for state, count in figures["states"].items())
            rows.append([fault, str(index), f"{seconds:.0f}",
                         *(str(figures.get(column, 0)) for column in COLUMNS), states])

    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
