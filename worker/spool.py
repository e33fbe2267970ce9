"""Results a worker owes the server, kept on disk until the server has them.

Every result call (an epoch's report, a completion, a failure) is first written to the
worker's spool folder, then delivered by the `Outbox`, oldest first. Epoch reports are
posted: written on the training thread, then delivered by the outbox's sender thread,
so that training goes on while the server answers. Completions and failures are sent:
written, then delivered on the caller's thread before it goes on. While the server
cannot be reached, entries wait and training goes on; they go out in the order they were
made when it answers again, at the next result or before the next claim. Nothing is
ever given up for lack of an answer: a worker that exits or dies with entries waiting
leaves them to the next worker started on the machine, which delivers them before it
claims anything.

| call                                          | returns                                        |
|-----------------------------------------------|------------------------------------------------|
| `outbox.post(call, trial, body, on_delivery)` | a `Posted` at once; the sender thread sends it |
| `outbox.send(call, trial, body)`              | the `Delivery`, after one pass on this thread  |
| `outbox.ended(lease_id)`                      | the server's "prune" or "stop", and its epoch  |
| `outbox.deliver()`, `outbox.drain(stop)`      | one pass; passes until the spool is empty      |

    {spool_dir}/{worker_id}/.lock                      held while the worker lives
    {spool_dir}/{worker_id}/000000000007-report.json   {"call", "trial_id", "study_name",
    {spool_dir}/{worker_id}/000000000008-complete.json  "number", "body"}

Delivering twice is harmless: the server records an epoch once and answers a repeated
completion or failure with the trial's state. Once the server has answered "prune" or
"stop" to a report, the trial's later reports are dropped unsent: the server has finished
the trial and would refuse them. An entry the server refuses is dropped with a log line:
409 (the lease was lost: the trial went to another worker, which reports its own
results) as a warning, any other 4xx as an error, except 401 and 403: a wrong token is
the worker's problem, not the result's, so the entry stays.

Errors: `SpoolBusy` when another live process holds the spool folder (two workers started
with one worker id).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel

from clrsearch import protocol
from worker.client import LeaseLost, ResultCall, ServerError, ServerUnreachable, WorkerClient

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# The pauses between delivery passes while the server does not answer.
FIRST_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 5.0


class SpoolBusy(RuntimeError):
    """Another live process holds this spool folder: two workers share one worker id."""


@dataclass(frozen=True)
class Entry:
    """One result call waiting in the spool."""

    sequence: int
    call: ResultCall
    trial_id: int
    study_name: str
    number: int
    body: dict[str, Any]
    path: Path

    @property
    def lease_id(self) -> str:
        return str(self.body.get("lease_id", ""))

    @property
    def label(self) -> str:
        return f"trial {self.number} of study {self.study_name!r}"

    @property
    def what(self) -> str:
        if self.call == "report":
            return f"epoch {self.body.get('epoch')} report"
        return {"complete": "completion", "fail": "failure"}.get(self.call, self.call)


class Spool:
    """A folder of result calls, in order, owned by one live worker process at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        while True:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                lock = _try_lock(self.folder)
            except _Vanished:
                continue  # adopted as an orphan between mkdir and lock: make it again
            break
        if lock is None:
            raise SpoolBusy(
                f"the spool folder {self.folder} is held by another live worker process; "
                "give each worker its own --worker-id"
            )
        self._lock_file: IO[str] | None = lock
        self._mutex = threading.Lock()
        entries = _read_entries(self.folder)
        self._next_sequence = entries[-1].sequence + 1 if entries else 1

    def __len__(self) -> int:
        return len(_entry_paths(self.folder))

    def append(
        self, call: ResultCall, trial_id: int, study_name: str, number: int,
        body: BaseModel | dict[str, Any],
    ) -> Entry:
        """Write one call to disk (atomically) and return its entry.

        Completions and failures are synced to the disk before this returns. Epoch
        reports are not: a process that dies leaves them in the page cache, whence they
        reach the disk anyway, and only a machine that loses power could lose one; its
        trial is then retried, and reports those epochs again. Syncing each took about
        10 ms per epoch, a tenth of a small epoch's training (docs/benchmarks.md).
        """
        payload = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
        with self._mutex:
            sequence = self._next_sequence
            self._next_sequence += 1
        path = self.folder / f"{sequence:012d}-{call}.json"
        document = {"call": call, "trial_id": trial_id, "study_name": study_name,
                    "number": number, "body": payload}
        _write_atomically(path, json.dumps(document, allow_nan=False), sync=call != "report")
        return Entry(sequence, call, trial_id, study_name, number, payload, path)

    def entries(self) -> list[Entry]:
        """The waiting entries, oldest first."""
        return _read_entries(self.folder)

    def remove(self, entry: Entry) -> None:
        entry.path.unlink(missing_ok=True)

    def adopt_orphans(self) -> int:
        """Take in the entries of spool folders whose worker is gone; returns how many.

        A worker restarted without a fixed `--worker-id` gets a new id, and so a new
        folder: the results its previous process left must not stay behind in the old one.
        """
        adopted = 0
        for folder in sorted(self.folder.parent.iterdir()):
            if folder == self.folder or not folder.is_dir():
                continue
            try:
                lock = _try_lock(folder)
            except _Vanished:
                continue  # adopted by another worker starting at the same time
            if lock is None:
                continue  # a live worker's own spool
            try:
                for entry in _read_entries(folder):
                    self.append(entry.call, entry.trial_id, entry.study_name, entry.number,
                                entry.body)
                    entry.path.unlink(missing_ok=True)
                    adopted += 1
                    logger.info("%s: %s left by worker %s taken into this worker's spool",
                                entry.label, entry.what, folder.name)
                (folder / LOCK_NAME).unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # not empty: a damaged entry set aside
                    folder.rmdir()
            finally:
                lock.close()
        return adopted

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


@dataclass
class Delivery:
    """What the server has said, so far, about one leased trial's results."""

    # The answer to the call just made, when it was delivered.
    answer: protocol.Decision | protocol.Ack | None
    # "prune" or "stop" when the server ended the trial on one of its reports.
    ended: str | None = None
    # The server refused a result with 409: the trial is no longer this worker's.
    lease_lost: bool = False
    # Entries still waiting in the spool, of any trial.
    waiting: int = 0


class Posted:
    """One spooled result on its way: settled by the first delivery pass that tries it,
    whether the server answered, the entry was dropped, or it waits for a later pass."""

    def __init__(self, entry: Entry,
                 on_delivery: Callable[[Delivery], None] | None = None) -> None:
        self.entry = entry
        self.delivery: Delivery | None = None
        self._on_delivery = on_delivery
        self._settled = threading.Event()

    def wait(self, timeout_s: float | None = None) -> Delivery | None:
        """What became of the result; None when `timeout_s` ran out first."""
        self._settled.wait(timeout_s)
        return self.delivery

    def _settle(self, delivery: Delivery) -> None:
        self.delivery = delivery
        try:
            if self._on_delivery is not None:
                self._on_delivery(delivery)
        except Exception:
            # The callback's trouble must not stop the delivery of the entries after it.
            logger.exception("%s: the callback on its %s failed", self.entry.label,
                             self.entry.what)
        finally:
            # Set last, so that a waiter sees what the callback did.
            self._settled.set()


class Outbox:
    """Delivers a spool's entries in order; results go through it, never around it.

    Delivery passes run one at a time, on the sender thread (started by the first `post`)
    or on the thread that calls `send`, `deliver` or `drain`; each lists the spool afresh,
    so an entry goes out after every entry written before it, whichever thread sends it.
    """

    def __init__(
        self, spool: Spool, client: WorkerClient,
        on_recorded: Callable[[Entry, protocol.Ack], None] | None = None,
    ) -> None:
        self.spool = spool
        self.client = client
        # Called with each completion or failure the server has recorded.
        self.on_recorded = on_recorded
        # What the server said about each lease: ended ("prune", "stop", with the epoch
        # whose report it answered) or lost (409).
        self._ended: dict[str, tuple[str, int]] = {}
        self._lost: set[str] = set()
        self._unreachable_since: float | None = None
        # The newest entry that was waiting when the server last failed to answer.
        self._backlog_end = 0
        # The server's last refusal of this worker's token, if the last pass met one.
        self._unauthorised: ServerError | None = None
        # One delivery pass at a time.
        self._lock = threading.Lock()
        # Posted entries not yet settled, by sequence. Writing an entry and tracking it
        # happen under `_tracking`, and so does a pass's listing of the spool: a pass
        # that lists an entry always finds its `Posted`.
        self._posted: dict[int, Posted] = {}
        self._tracking = threading.Lock()
        # Claims to send with a completion's first try, by sequence (`send`); never on
        # disk, so that a completion delivered later, or by another worker, claims nothing.
        self._claims_next: dict[int, protocol.ClaimRequest] = {}
        # False once a server older than `claim_next` refused it: claims go apart then.
        self.server_takes_claims = True
        # The sender thread and what wakes it: a post since its last pass, or close.
        self._sender: threading.Thread | None = None
        self._wake = threading.Condition()
        self._pending = False
        self._closing = False

    def post(
        self, call: ResultCall, trial: protocol.TrialAssignment, body: BaseModel,
        on_delivery: Callable[[Delivery], None] | None = None,
    ) -> Posted:
        """Spool one result and leave its delivery to the sender thread; returns at once.

        The entry is on disk when this returns. `on_delivery` is called, on the thread
        that delivers, once the first pass has tried the entry: with the server's answer,
        or with none (the server is away and the entry waits, or the lease had ended).
        """
        posted = self._spool(call, trial, body, on_delivery)
        with self._wake:
            if self._closing:
                raise RuntimeError("the outbox is closed; nothing more can be posted")
            self._pending = True
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_posted, daemon=True,
                                                name=f"outbox-{self.spool.folder.name}")
                self._sender.start()
            self._wake.notify()
        return posted

    def send(
        self, call: ResultCall, trial: protocol.TrialAssignment, body: BaseModel,
        claim_next: protocol.ClaimRequest | None = None,
    ) -> Delivery:
        """Spool one result, then deliver what waits, once, on this thread; never waits
        for a server that does not answer (beyond one try of each call).

        `claim_next` (completions only) goes with the first try of this result, and the
        server's answer to it comes back in the delivered `Ack.next`.
        """
        posted = self._spool(call, trial, body, None, claim_next)
        self.deliver()
        # The pass just made, or one before it on the sender thread, has settled it.
        delivery = posted.wait(0)
        if delivery is None:  # cannot happen: a pass lists every entry written before it
            return Delivery(answer=None, ended=self._action(trial.lease_id),
                            lease_lost=trial.lease_id in self._lost, waiting=len(self.spool))
        return delivery

    def ended(self, lease_id: str) -> tuple[str, int] | None:
        """The server's "prune" or "stop" to a report of this lease, with that report's
        epoch; None while it has answered none of them so."""
        return self._ended.get(lease_id)

    def deliver(self) -> dict[int, protocol.Decision | protocol.Ack]:
        """One pass over the spool, oldest first, stopping at the first call the server
        does not answer; returns the answers by entry sequence."""
        answers: dict[int, protocol.Decision | protocol.Ack] = {}
        with self._lock:
            self._unauthorised = None
            with self._tracking:
                entries = self.spool.entries()
            try:
                self._deliver(entries, answers)
            finally:
                # Entries this pass did not reach wait for a later one; whoever posted
                # them hears so now rather than waiting for that pass.
                for entry in entries:
                    self._settle(entry, None)
        return answers

    def _deliver(
        self, entries: list[Entry], answers: dict[int, protocol.Decision | protocol.Ack]
    ) -> None:
        for entry in entries:
            answer: protocol.Decision | protocol.Ack | None = None
            if entry.call == "report" and entry.lease_id in self._ended:
                logger.info("%s: %s dropped: the server already ended the trial (%s)",
                            entry.label, entry.what, self._ended[entry.lease_id][0])
                self.spool.remove(entry)
                self._settle(entry, None)
                continue
            with self._tracking:
                claim_next = self._claims_next.pop(entry.sequence, None)
            try:
                answer = self._send(entry, claim_next)
            except ServerUnreachable as error:
                self._note_unreachable(error, entries[-1].sequence)
                return
            except LeaseLost as error:
                logger.warning("%s: %s dropped: %s", entry.label, entry.what, error)
                self._lost.add(entry.lease_id)
            except ServerError as error:
                if error.unauthorised:
                    # The token, not the result, is wrong: keep it for a worker that
                    # has the right one.
                    logger.error("%s: %s kept in the spool: %s", entry.label, entry.what,
                                 error)
                    self._unauthorised = error
                    return
                logger.error("%s: %s refused by the server and dropped: %s", entry.label,
                             entry.what, error)
            else:
                answers[entry.sequence] = answer
                self._recorded(entry, answer)
            self.spool.remove(entry)
            self._settle(entry, answer)
        if self._unreachable_since is not None:
            logger.info("server answers again after %.1f s; every spooled result is "
                        "delivered", time.monotonic() - self._unreachable_since)
            self._unreachable_since = None

    def _send(self, entry: Entry, claim_next: protocol.ClaimRequest | None
              ) -> protocol.Decision | protocol.Ack:
        """One try of an entry, with the claim that goes with it, if any."""
        if claim_next is None:
            return self.client.send_result(entry.call, entry.trial_id, entry.body,
                                           patience_s=0)
        body = {**entry.body, "claim_next": claim_next.model_dump(mode="json")}
        try:
            return self.client.send_result(entry.call, entry.trial_id, body, patience_s=0)
        except ServerError as error:
            if error.status_code != 422:
                raise
        # A server older than `claim_next` refuses the field, not the result: the
        # completion goes again without it, and claims go apart from now on.
        logger.info("%s: the server does not take a claim with a completion; claims go "
                    "apart", entry.label)
        self.server_takes_claims = False
        return self._send(entry, None)

    def drain(self, stop: threading.Event) -> bool:
        """Deliver until the spool is empty, pausing longer after each failed pass; False
        when `stop` was set first. Raises `ServerError` when the server refuses the
        worker's token: waiting would not help, and the entries stay for a later start."""
        delay_s = FIRST_RETRY_DELAY_S
        while True:
            self.deliver()
            if len(self.spool) == 0:
                return True
            if self._unauthorised is not None:
                raise self._unauthorised
            if stop.wait(delay_s):
                return False
            delay_s = min(delay_s * 2, MAX_RETRY_DELAY_S)

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the sender thread after the pass it owes, if any; posting ends here."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._sender is not None:
            self._sender.join(timeout_s)

    def _spool(
        self, call: ResultCall, trial: protocol.TrialAssignment, body: BaseModel,
        on_delivery: Callable[[Delivery], None] | None,
        claim_next: protocol.ClaimRequest | None = None,
    ) -> Posted:
        if claim_next is not None and call != "complete":
            raise ValueError(f"only a completion can carry the next claim, not a {call}")
        with self._tracking:
            entry = self.spool.append(call, trial.trial_id, trial.study_name, trial.number,
                                      body)
            posted = Posted(entry, on_delivery)
            self._posted[entry.sequence] = posted
            if claim_next is not None and self.server_takes_claims:
                self._claims_next[entry.sequence] = claim_next
        return posted

    def _settle(self, entry: Entry, answer: protocol.Decision | protocol.Ack | None) -> None:
        with self._tracking:
            posted = self._posted.pop(entry.sequence, None)
            # A claim goes with the first pass that lists its completion or not at all:
            # a completion that waits is delivered before a claim of its own.
            self._claims_next.pop(entry.sequence, None)
        if posted is not None:
            posted._settle(Delivery(
                answer=answer, ended=self._action(entry.lease_id),
                lease_lost=entry.lease_id in self._lost, waiting=len(self.spool),
            ))

    def _action(self, lease_id: str) -> str | None:
        ended = self._ended.get(lease_id)
        return ended[0] if ended is not None else None

    def _send_posted(self) -> None:
        """The sender thread: one pass after each wake-up, until the outbox is closed."""
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                self._pending = False
            try:
                self.deliver()
            except Exception:
                # A surprise (a malformed answer, a full disk): the entries stay in the
                # spool for the next pass, and the thread lives on to make it.
                logger.exception("delivering the spool at %s failed; its results wait for "
                                 "the next pass", self.spool.folder)

    def _recorded(self, entry: Entry, answer: protocol.Decision | protocol.Ack) -> None:
        if entry.sequence <= self._backlog_end:
            logger.info("%s: spooled %s delivered", entry.label, entry.what)
        if isinstance(answer, protocol.Decision):
            if answer.action != "continue":
                self._ended[entry.lease_id] = (answer.action, int(entry.body["epoch"]))
            return
        if self.on_recorded is not None:
            self.on_recorded(entry, answer)
    def _note_unreachable(self, error: ServerUnreachable, newest: int) -> None:
        self._backlog_end = newest
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
            logger.warning("server unreachable (%s): %d results wait in the spool at %s; "
                           "training goes on and they are delivered when it answers",
                           error, len(self.spool), self.spool.folder)
        else:
            logger.debug("server still unreachable: %s", error)


class _Vanished(Exception):
    """The folder or its lock file was removed (adopted) while being locked."""


def _try_lock(folder: Path) -> IO[str] | None:
    """An exclusive lock on the folder's lock file, or None when a live process holds it.

    The lock goes with the process: the kernel releases it when the process dies, however
    it dies, so a folder whose lock can be taken has no live owner. An adopter removes the
    lock file and the folder while holding the lock, so a lock taken on a file that is no
    longer the folder's lock file is worthless: `_Vanished` says to start again.
    """
    path = folder / LOCK_NAME
    try:
        handle = path.open("a")
    except FileNotFoundError:
        raise _Vanished(folder) from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    try:
        same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        handle.close()
        raise _Vanished(folder)
    return handle


def _entry_paths(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("*.json") if not path.name.startswith("."))


def _read_entries(folder: Path) -> list[Entry]:
    entries = []
    for path in _entry_paths(folder):
        try:
            document = json.loads(path.read_text())
            entries.append(Entry(
                sequence=int(path.name.split("-", 1)[0]), call=document["call"],
                trial_id=int(document["trial_id"]), study_name=str(document["study_name"]),
                number=int(document["number"]), body=dict(document["body"]), path=path,
            ))
        except FileNotFoundError:
            continue  # delivered (or adopted) by another thread since the listing
        except (OSError, ValueError, KeyError, TypeError) as error:
            # Entries are written whole (temporary file, then rename), so this is damage
            # from outside; keep the file for a person to read, out of the delivery order.
            damaged = path.with_name(f".{path.name}.damaged")
            os.replace(path, damaged)
            logger.error("spool entry %s cannot be read (%s); set aside as %s", path, error,
                         damaged)
    return entries


def _write_atomically(path: Path, text: str, sync: bool = True) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w") as handle:
        handle.write(text)
        if sync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temporary, path)
