"""`clrsearch worker --devices`: one worker process per device, pinned, kept alive.

There is no GPU here, so the devices are faked the way a container runtime shows them:
CUDA_VISIBLE_DEVICES=0,1 in the supervisor's environment. Each child's own environment
is then read from /proc, which is what CUDA would read in it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.processes import clrsearch, free_port, stop, wait_healthy
from worker.supervisor import Supervisor, resolve_devices

PROC = Path("/proc")


def child_pids(parent: int) -> set[int]:
    children = set()
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            children.add(int(stat.parent.name))
    return children


def environment_of(pid: int) -> dict[str, str]:
    raw = (PROC / str(pid) / "environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def started_environment_of(pid: int, parents: dict[str, str], timeout_s: float = 20
                           ) -> dict[str, str]:
    """The child's environment once it has run its own program: between fork and exec,
    /proc still shows the supervisor's environment."""
    deadline = time.monotonic() + timeout_s
    environment = environment_of(pid)
    while environment == parents and time.monotonic() < deadline:
        time.sleep(0.05)
        environment = environment_of(pid)
    return environment


def catches(pid: int, signum: int) -> bool:
    """Whether the process has installed a handler for the signal (SigCgt in /proc)."""
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    return False


def wait_for(condition, timeout_s: float, what: str, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()}")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_devices_all_pins_one_worker_per_device_and_restarts_a_killed_one(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "processes.log"
    server = clrsearch("serve", "--port", str(port), "--database-url",
                       f"sqlite:///{tmp_path / 'clrsearch.db'}", log=log)
    supervisor = clrsearch("worker", "--devices", "all", "--server", url, "--threads", "1",
                           "--data-dir", str(tmp_path / "data"), log=log,
                           env={"CUDA_VISIBLE_DEVICES": "0,1"})
    try:
        first = wait_for(lambda: (found := child_pids(supervisor.pid)) and len(found) == 2
                         and found, 30, "two worker processes", log)
        parents = environment_of(supervisor.pid)
        seen = {pid: started_environment_of(pid, parents) for pid in first}
        wait_healthy(url, server, log)
        # Both children are real workers: each polls the server under its own id.
        host = socket.gethostname()
        wait_for(lambda: {worker["id"] for worker in
                          httpx.get(f"{url}/api/v1/workers", timeout=5).json()}
                 == {f"{host}-gpu0", f"{host}-gpu1"}, 60, "both workers polling", log)

        victim = min(first)
        victim_device = seen[victim]["CUDA_VISIBLE_DEVICES"]
        os.kill(victim, signal.SIGKILL)
        after = wait_for(lambda: (found := child_pids(supervisor.pid)) and len(found) == 2
                         and victim not in found and found, 30, "the restart", log)
        replacement = (after - first).pop()
        replacement_environment = started_environment_of(replacement, parents)
        # Stopped while still importing torch, it would die of the signal before its
        # handler exists, and nothing would show that it was passed on.
        wait_for(lambda: catches(replacement, signal.SIGTERM), 30,
                 "the restarted worker's signal handler", log)

        supervisor.send_signal(signal.SIGTERM)
        exit_code = supervisor.wait(timeout=30)
        left_behind = child_pids(supervisor.pid)
    finally:
        stop(supervisor, server)

    assert sorted(env["CUDA_VISIBLE_DEVICES"] for env in seen.values()) == ["0", "1"]
    assert {env["CLRSEARCH_WORKER_ID"] for env in seen.values()} == {
        f"{host}-gpu0", f"{host}-gpu1"}
    assert replacement_environment["CUDA_VISIBLE_DEVICES"] == victim_device
    assert replacement_environment["CLRSEARCH_WORKER_ID"] == f"{host}-gpu{victim_device}"
    assert exit_code == 0
    assert not left_behind
    text = log.read_text()
    assert "died with signal 9" in text
    # Exit code 0, not death by SIGTERM: each worker handled the signal and left.
    assert text.count("left with exit code 0") == 2


def test_a_worker_that_leaves_cleanly_is_not_restarted_and_a_crashed_one_is(tmp_path):
    # Stand-in children: the first run of device 1 crashes, every other run exits 0.
    marker = tmp_path / "crashed-once"
    script = (
        "import os, pathlib, sys\n"
        f"marker = pathlib.Path({str(marker)!r})\n"
        "if os.environ['CUDA_VISIBLE_DEVICES'] == '1' and not marker.exists():\n"
        "    marker.touch()\n"
        "    sys.exit(3)\n"
        "assert sys.argv[1:] == ['--server', 'x', '--worker-id',"
        " 'box-gpu' + os.environ['CUDA_VISIBLE_DEVICES']], sys.argv\n"
    )
    supervisor = Supervisor(["0", "1"], ["--server", "x"], "box", restart_delay_s=0.05,
                            poll_s=0.02, command=[sys.executable, "-c", script])

    exit_code = supervisor.run()

    assert exit_code == 0
    assert [child.restarts for child in supervisor.children] == [0, 1]
    assert all(child.finished for child in supervisor.children)


def test_a_stop_reaches_every_child_and_the_supervisor_waits_for_them(tmp_path):
    script = (
        "import pathlib, signal, sys, time\n"
        "def leave(*_):\n"
        f"    pathlib.Path({str(tmp_path)!r}, sys.argv[-1]).touch()\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, leave)\n"
        f"pathlib.Path({str(tmp_path)!r}, 'ready-' + sys.argv[-1]).touch()\n"
        "time.sleep(60)\n"
    )
    supervisor = Supervisor(["0", "1"], [], "box", poll_s=0.02,
                            command=[sys.executable, "-c", script])

    def stop_when_both_are_ready() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(list(tmp_path.glob("ready-*"))) < 2:
            time.sleep(0.02)
        supervisor.request_stop()

    threading.Thread(target=stop_when_both_are_ready, daemon=True).start()
    started = time.monotonic()
    exit_code = supervisor.run()

    assert exit_code == 0
    assert time.monotonic() - started < 20
    assert sorted(path.name for path in tmp_path.glob("box-*")) == ["box-gpu0", "box-gpu1"]


@pytest.mark.parametrize(
    ("requested", "environ", "expected"),
    [
        ("all", {"CUDA_VISIBLE_DEVICES": "0,1"}, ["0", "1"]),
        ("all", {"CUDA_VISIBLE_DEVICES": "2, 3"}, ["2", "3"]),
        ("all", {"CUDA_VISIBLE_DEVICES": "GPU-abc,-1,4"}, ["GPU-abc"]),
        ("all", {}, ["0", "1", "2"]),
        ("0,1", {"CUDA_VISIBLE_DEVICES": "5"}, ["0", "1"]),
        (" 3 ", {}, ["3"]),
    ],
)
def test_devices_are_read_from_the_option_or_what_cuda_may_see(requested, environ, expected):
    assert resolve_devices(requested, environ, count_devices=lambda: 3) == expected


@pytest.mark.parametrize(
    ("requested", "environ", "message"),
    [
        ("all", {"CUDA_VISIBLE_DEVICES": ""}, "found no CUDA device"),
        ("all", {"CUDA_VISIBLE_DEVICES": "-1"}, "found no CUDA device"),
        ("0,,1", {}, "expected 'all' or a list"),
        ("0,0", {}, "names a device twice"),
    ],
)
def test_devices_that_name_nothing_are_refused(requested, environ, message):
    with pytest.raises(ValueError, match=message):
        resolve_devices(requested, environ, count_devices=lambda: 0)


def test_devices_all_on_a_machine_without_gpus_exits_with_a_usage_error():
    result = subprocess.run(
        [sys.executable, "-m", "clrsearch", "worker", "--devices", "all"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""},
    )

    assert result.returncode == 2
    assert "found no CUDA device" in result.stderr
