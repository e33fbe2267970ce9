"""The README's first command: `make demo` runs `clrsearch demo`, a real server and real
workers on the bundled digits data, and prints the best settings found."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.processes import free_port


def test_demo_runs_a_study_end_to_end_and_shows_the_best_settings(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clrsearch", "demo", "--trials", "3", "--workers", "1",
         "--port", str(free_port()), "--database-url", f"sqlite:///{tmp_path / 'demo.db'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "CLRSEARCH_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "120"},
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "best settings against the" in result.stdout
    ended = re.search(r"(\d+) complete, (\d+) pruned, (\d+) failed", result.stdout)
    assert ended is not None, result.stdout
    complete, pruned, failed = map(int, ended.groups())
    assert (complete + pruned, failed) == (3, 0)
    assert complete >= 1  # trial 0 ran before the pruner had anything to compare with
    assert (tmp_path / "clrsearch-demo.log").exists()
