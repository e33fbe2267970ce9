"""One worker process per GPU: what `clrsearch worker --devices all` (or `0,1`) runs.

Each child is a plain `clrsearch worker` with `CUDA_VISIBLE_DEVICES` set to its one
device, so inside it that GPU is `cuda:0` and the others do not exist: a child cannot
allocate on a neighbour's GPU by mistake, and a crash (out of memory, a driver error)
takes down one device's worker, not all of them. Each child gets a stable worker id,
`<base>-gpu<device>`, so a restarted child gets back the trial it held.

A child that exits with an error or dies of a signal is started again, after a delay
that doubles with each quick death (1 s up to 60 s) so that a broken GPU does not spin.
A child that exits cleanly on its own (`--max-idle-s`) is left alone; the supervisor
ends when every child has. SIGTERM and SIGINT are passed on to the children, which hand
their trials back and leave; a second signal is passed on too, and they leave at once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = ["Supervisor", "child_worker_id", "resolve_devices"]

_PR_SET_PDEATHSIG = 1


def resolve_devices(requested: str, environ: Mapping[str, str] | None = None,
                    count_devices: Callable[[], int] | None = None) -> list[str]:
    """The devices to run a worker on: 'all', or a comma-separated list such as '0,1'.

    'all' means the devices this process may see: the entries of CUDA_VISIBLE_DEVICES
    when it is set (so that a supervisor itself limited to '2,3' pins its children to
    2 and 3), else every device CUDA counts. Entries are passed to the children as
    CUDA_VISIBLE_DEVICES values, so indices and `GPU-<uuid>` names both work.
    """
    environ = os.environ if environ is None else environ
    requested = requested.strip()
    if requested == "all":
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            devices = []
            for entry in (part.strip() for part in visible.split(",")):
                # CUDA ignores everything from the first invalid entry on ("-1" hides all).
                if not entry or entry.startswith("-"):
                    break
                devices.append(entry)
        else:
            devices = [str(index) for index in range((count_devices or _cuda_count)())]
        if not devices:
            raise ValueError(
                "--devices all found no CUDA device (CUDA_VISIBLE_DEVICES="
                f"{visible!r}); run a plain worker with --device cpu instead"
            )
        return devices
    devices = [part.strip() for part in requested.split(",")]
    if not all(devices):
        raise ValueError(f"--devices {requested!r}: expected 'all' or a list such as 0,1")
    if len(set(devices)) != len(devices):
        raise ValueError(f"--devices {requested!r} names a device twice")
    return devices


def child_worker_id(base: str, device: str) -> str:
    return f"{base}-gpu{device}"


def _cuda_count() -> int:
    import torch  # only `--devices all` without CUDA_VISIBLE_DEVICES pays for the import

    return torch.cuda.device_count()


@dataclass
class _Child:
    device: str
    worker_id: str
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    start_at: float = 0.0
    quick_deaths: int = 0
    restarts: int = 0
    finished: bool = False


class Supervisor:
    """Keeps one `clrsearch worker` process per device alive until told to stop."""

    def __init__(
        self,
        devices: Sequence[str],
        worker_args: Sequence[str],
        base_worker_id: str,
        *,
        restart_delay_s: float = 1.0,
        max_restart_delay_s: float = 60.0,
        stable_after_s: float = 60.0,
        poll_s: float = 0.2,
        command: Sequence[str] | None = None,
    ) -> None:
        self.command = list(command or [sys.executable, "-m", "clrsearch", "worker"])
        self.children = [_Child(device, child_worker_id(base_worker_id, device))
                         for device in devices]
        self.worker_args = list(worker_args)
        self.restart_delay_s = restart_delay_s
        self.max_restart_delay_s = max_restart_delay_s
        # A child that ran this long before dying starts again after the shortest delay.
        self.stable_after_s = stable_after_s
        self.poll_s = poll_s
        self._signals: list[int] = []
        self._wake = threading.Event()

    def install_signal_handlers(self) -> None:
        def note(signum: int, _frame: object) -> None:
            # Only a list append: the handler runs between two bytecodes of the main
            # thread, which may hold the wake event's lock; the next poll sees it.
            self._signals.append(signum)

        signal.signal(signal.SIGINT, note)
        signal.signal(signal.SIGTERM, note)

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Pass a stop on to the children, as a signal would (for other threads)."""
        self._signals.append(signum)
        self._wake.set()

    def run(self) -> int:
        """Start the children and keep them running until all have left; returns 0."""
        logger.info("supervising %d worker processes, one per device: %s",
                    len(self.children), ", ".join(child.device for child in self.children))
        forwarded = 0
        while True:
            now = time.monotonic()
            stopping = bool(self._signals)
            while forwarded < len(self._signals):
                self._forward(self._signals[forwarded], first=forwarded == 0)
                forwarded += 1
            for child in self.children:
                if child.process is not None and child.process.poll() is not None:
                    self._reap(child, stopping, now)
                elif (child.process is None and not child.finished and not stopping
                      and now >= child.start_at):
                    self._start(child)
            if all(child.process is None and (child.finished or stopping)
                   for child in self.children):
                break
            self._wake.wait(self.poll_s)
            self._wake.clear()
        logger.info("all worker processes have left")
        return 0

    def _start(self, child: _Child) -> None:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": child.device,
               "CLRSEARCH_WORKER_ID": child.worker_id}
        command = [*self.command, *self.worker_args, "--worker-id", child.worker_id]
        # Its own process group: a Ctrl-C in the terminal reaches only the supervisor,
        # which passes it on once; the child would otherwise take it as a second signal
        # and leave without handing its trial back.
        child.process = subprocess.Popen(command, env=env, process_group=0,
                                         preexec_fn=_die_with_parent())
        child.started_at = time.monotonic()
        logger.info("started worker %s (pid %d) on device %s", child.worker_id,
                    child.process.pid, child.device)

    def _reap(self, child: _Child, stopping: bool, now: float) -> None:
        assert child.process is not None
        code = child.process.returncode
        pid = child.process.pid
        child.process = None
        if stopping or code == 0:
            child.finished = True
            logger.info("worker %s (pid %d) left with exit code %d", child.worker_id, pid,
                        code)
            return
        ran_s = now - child.started_at
        child.quick_deaths = 0 if ran_s >= self.stable_after_s else child.quick_deaths + 1
        delay_s = min(self.restart_delay_s * 2 ** max(child.quick_deaths - 1, 0),
                      self.max_restart_delay_s)
        child.start_at = now + delay_s
        child.restarts += 1
        cause = f"signal {-code}" if code < 0 else f"exit code {code}"
        logger.warning("worker %s (pid %d, device %s) died with %s after %.0f s; "
                       "restarting it in %.0f s (restart %d)", child.worker_id, pid,
                       child.device, cause, ran_s, delay_s, child.restarts)

    def _forward(self, signum: int, first: bool) -> None:
        if first:
            logger.warning("got signal %d: asking the workers to hand back their trials "
                           "and leave", signum)
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                # SIGTERM whatever came in: the workers treat SIGINT and SIGTERM alike.
                child.process.send_signal(signal.SIGTERM)


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook so a child gets SIGTERM if the supervisor is killed outright."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl

    def hook() -> None:
        # Without this, `kill -9` of the supervisor would leave its workers running,
        # holding GPUs and trials that no one supervises.
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook
