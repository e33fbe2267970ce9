"""Ask-ahead: each study's next trial is sampled in a process of its own, before it is
claimed.

TPE's own work is the largest part of a claim, and it grows with the study (about 11 ms
per trial at 1,000 trials on this project's 2-core machine, more than all of a trial's
SQL). Done in the server it holds the GIL, so reports and claims wait for it. Done in a
second process it runs on another core while workers report:

    server process                                        proposer process
    a claim or a tell commits ─▶ AskAhead.request(spec) ─ pipe ─▶ reads the journal's
                                                                  new lines, drafts
    AskAhead.ready[study]  ◀── receiver thread  ◀──────── pipe ── the next trial
    the next claim: AskAhead.take(...) ─▶ OptunaBridge.ask(spec, proposal)

The proposer reads Optuna's journal from the database as any tool would (it never
writes) and drafts a trial with the calls an ask would make (`_DraftTrial`); the claim
then asks Optuna for a trial with those settings (`OptunaBridge.ask`), so what is stored
is an ordinary Optuna trial.

What it changes in the search: a drafted trial has not seen the trials that finished
after it was drafted. A draft that missed more than `MISSED_FINISHED_ALLOWED` finished
trials is never handed out: a new one is drafted after every tell, and a claim waits for
it or samples itself. One missed trial is what plain Optuna gives when one more worker
runs in parallel (TPE's constant liar counts that trial as running). Drafts consume the
sampler's random numbers in an order that depends on timing, so a seeded study is not
repeatable run to run with ask-ahead on; that is why it is off unless
`CLRSEARCH_ASK_AHEAD=true`.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger(__name__)

# A draft is handed out while it has missed at most this many finished trials.
MISSED_FINISHED_ALLOWED = 1
# How long a claim waits for a draft in flight before it samples by itself. A draft
# takes milliseconds; this only bounds a proposer that hangs.
WAIT_FOR_DRAFT_S = 2.0
# A proposer that dies is started again, but not more often than this.
RESTART_AFTER_S = 5.0


@dataclass
class _StudyDrafts:
    ready: Any = None  # the latest Proposal received, not yet taken
    in_flight: bool = False
    # Finished trials when the draft in flight was asked for: it sees at least these.
    in_flight_finished: int = 0
    # A request came while a draft was in flight: draft again when it arrives.
    again: tuple[dict[str, Any], int] | None = None
    arrived: threading.Condition = field(default_factory=threading.Condition)


class AskAhead:
    """The server's side of the proposer: sends requests, keeps what comes back.

    Thread-safe. The process is started at the first request and stopped by `close`.
    At most one draft per study is in flight; requests made meanwhile are folded into one
    more draft once it arrives.
    """

    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._lock = threading.Lock()
        self._studies: dict[str, _StudyDrafts] = {}
        self._process: subprocess.Popen | None = None
        self._connection: Connection | None = None
        self._receiver: threading.Thread | None = None
        self._started_at = 0.0
        # Whether the running process has answered yet: until then (its start-up takes
        # a second or two) claims sample by themselves rather than wait for it.
        self._answering = False
        self._closed = False

    def request(self, spec_json: dict[str, Any], finished: int, asked: bool) -> None:
        """Draft the next trial of this study (the spec as JSON), which has `finished`
        trials now. After a trial was `asked` the draft is always redone, so that it
        counts that trial as running; after a tell only if the draft at hand would miss
        too many finished trials. Never raises: it runs after a commit, and a claim can
        always sample by itself."""
        try:
            self._request(spec_json, finished, asked)
        except Exception:
            logger.warning("ask-ahead request for study %r failed; claims sample by "
                           "themselves", spec_json.get("name"), exc_info=True)

    def _request(self, spec_json: dict[str, Any], finished: int, asked: bool) -> None:
        name = spec_json["name"]
        with self._lock:
            if self._closed:
                return
            drafts = self._studies.setdefault(name, _StudyDrafts())
            if drafts.in_flight:
                if asked or finished - drafts.in_flight_finished > MISSED_FINISHED_ALLOWED:
                    drafts.again = (spec_json, finished)
                return
            ready = drafts.ready
            if not asked and ready is not None and (
                    finished - ready.finished <= MISSED_FINISHED_ALLOWED):
                return
            if self._send(spec_json):
                drafts.in_flight, drafts.in_flight_finished = True, finished

    def take(self, name: str, finished: int) -> Any:
        """A draft for study `name` that missed at most `MISSED_FINISHED_ALLOWED` of its
        `finished` trials, or None; waits for a draft in flight when none is fit."""
        with self._lock:
            drafts = self._studies.get(name)
        if drafts is None:
            return None
        deadline = time.monotonic() + WAIT_FOR_DRAFT_S
        with drafts.arrived:
            while True:
                ready = drafts.ready
                if ready is not None and finished - ready.finished <= MISSED_FINISHED_ALLOWED:
                    drafts.ready = None
                    return ready
                left = deadline - time.monotonic()
                if not (drafts.in_flight and self._answering) or left <= 0 or self._closed:
                    return None
                drafts.arrived.wait(left)

    def wait_until_answering(self, timeout_s: float) -> bool:
        """Whether the proposer answered a request within `timeout_s` (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while not self._answering and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._answering

    def close(self) -> None:
        with self._lock:
            self._closed = True
            process, connection = self._process, self._connection
            self._process = self._connection = None
        for drafts in list(self._studies.values()):
            with drafts.arrived:
                drafts.arrived.notify_all()
        if connection is not None:
            try:
                connection.send(None)
            except OSError:
                pass  # it is gone already
        if process is not None:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if connection is not None:
            connection.close()

    def _send(self, spec_json: dict[str, Any]) -> bool:
        """Send a request, starting the process first if needed (the caller holds _lock)."""
        if self._connection is None:
            if time.monotonic() - self._started_at < RESTART_AFTER_S and self._started_at:
                return False  # it died a moment ago: claims sample by themselves meanwhile
            self._start()
        assert self._connection is not None
        try:
            self._connection.send(spec_json)
        except OSError as error:
            logger.warning("ask-ahead proposer unreachable (%s); claims sample by "
                           "themselves until it is started again", error)
            self._connection = None
            return False
        return True

    def _start(self) -> None:
        # A fresh interpreter, not a fork (the server has threads and open connections a
        # fork would copy) and not multiprocessing's spawn (it re-imports the program's
        # main module); it talks over one end of a socket pair and exits at its EOF.
        ours, theirs = socket.socketpair()
        process = subprocess.Popen(
            [sys.executable, "-m", "service.proposer", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.PIPE,
        )
        theirs.close()
        assert process.stdin is not None
        # The database URL may hold a password: it goes through a pipe, not argv.
        process.stdin.write(self._database_url.encode())
        process.stdin.close()
        self._process, self._connection = process, Connection(ours.detach())
        self._started_at, self._answering = time.monotonic(), False
        self._receiver = threading.Thread(target=self._receive, args=(self._connection,),
                                          name="clrsearch-proposer-receiver", daemon=True)
        self._receiver.start()
        logger.info("ask-ahead proposer started (pid %d)", process.pid)

    def _receive(self, connection: Connection) -> None:
        while True:
            try:
                name, proposal = connection.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                self._answering = True
                drafts = self._studies.setdefault(name, _StudyDrafts())
                again, drafts.again = drafts.again, None
                drafts.in_flight = again is not None and self._send(again[0])
                if again is not None:
                    drafts.in_flight_finished = again[1]
            with drafts.arrived:
                if proposal is not None:
                    drafts.ready = proposal
                drafts.arrived.notify_all()
        with self._lock:
            if self._connection is connection:
                if not self._closed:
                    logger.warning("ask-ahead proposer stopped; claims sample by themselves "
                                   "until it is started again")
                self._connection = None
            for drafts in self._studies.values():
                drafts.in_flight = False
                drafts.again = None
        for drafts in list(self._studies.values()):
            with drafts.arrived:
                drafts.arrived.notify_all()


def _serve(database_url: str, connection: Connection) -> None:
    """The proposer process: answer each request with (study name, Proposal or None)."""
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported here: the server process need not load them twice over for this module.
    import optuna

    from clrsearch.spec import StudySpec
    from service.optuna_bridge import draft_next_trial, read_only_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = read_only_storage(database_url)
    studies: dict[str, optuna.Study] = {}
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return  # the server is gone
        if message is None:
            return
        name = message.get("name", "?")
        try:
            spec = StudySpec.model_validate(message)
            proposal = draft_next_trial(storage, studies, spec)
        except Exception:
            logger.exception("ask-ahead proposer could not draft a trial of study %r", name)
            proposal = None
        try:
            connection.send((name, proposal))
        except OSError:
            return


if __name__ == "__main__":
    _serve(sys.stdin.read(), Connection(int(sys.argv[1])))
