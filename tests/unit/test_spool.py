"""The spool: results kept on disk, delivered in order, never lost to an absent server."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from clrsearch import protocol
from clrsearch.spec import CyclicParams, TaskSpec
from worker.client import LeaseLost, ServerError, ServerUnreachable, WorkerClient
from worker.loop import Worker
from worker.settings import WorkerSettings
from worker.spool import Outbox, Spool, SpoolBusy


class FakeServer:
    """Stands in for `WorkerClient`: records calls, answers or fails as told."""

    def __init__(self) -> None:
        self.down = False
        self.calls: list[tuple[str, int, Any]] = []
        # Answers by (call, epoch): an exception to raise or an action for a report.
        self.answers: dict[tuple[str, Any], Any] = {}
        self.claims: list[protocol.TrialAssignment | None] = []

    def send_result(self, call: str, trial_id: int, body: dict, patience_s=None):
        if self.down:
            raise ServerUnreachable("connection refused")
        key = (call, body.get("epoch"))
        self.calls.append((call, trial_id, body.get("epoch")))
        answer = self.answers.get(key)
        if isinstance(answer, Exception):
            raise answer
        if call == "report":
            return protocol.Decision(action=answer or "continue")
        ack = protocol.Ack(recorded=True, state="complete" if call == "complete" else "queued")
        if body.get("claim_next") is not None:
            self.calls.append(("claim with the completion", trial_id, None))
            ack.next = protocol.ClaimResponse(trial=self.claims.pop(0) if self.claims
                                              else None, retry_after_s=0.01)
        return ack

    def claim(self, request: protocol.ClaimRequest, patience_s=None) -> protocol.ClaimResponse:
        self.calls.append(("claim", 0, None))
        trial = self.claims.pop(0) if self.claims else None
        return protocol.ClaimResponse(trial=trial, retry_after_s=0.01)

    def heartbeat(self, trial_id: int, lease_id: str, patience_s=None) -> protocol.Decision:
        return protocol.Decision(action="continue")

    def close(self) -> None:
        pass


def assignment(lease_id: str = "lease-1", number: int = 4, epochs: int = 3
               ) -> protocol.TrialAssignment:
    return protocol.TrialAssignment(
        trial_id=10 + number, lease_id=lease_id, study_name="spooled", number=number,
        attempt=1, params=CyclicParams(base_lr=0.01, max_lr=0.1, step_size_up=1),
        task=TaskSpec(model="mlp", epochs=epochs, batch_size=64), objective="val_loss",
        lease_s=60, heartbeat_s=30,
    )


def report(epoch: int, lease_id: str = "lease-1") -> protocol.EpochReport:
    return protocol.EpochReport(lease_id=lease_id, epoch=epoch, iterations=epoch * 5,
                                train_loss=1.0, val_loss=1.0, val_accuracy=0.5, duration_s=0.1,
                                lrs=[0.01, 0.1 / 3], momentums=[0.95, 0.9])


def complete(lease_id: str = "lease-1") -> protocol.CompleteRequest:
    return protocol.CompleteRequest(lease_id=lease_id, value=0.25)


@pytest.fixture
def spool(tmp_path: Path):
    opened = Spool(tmp_path / "spool" / "w1")
    yield opened
    opened.close()


def test_entries_come_back_in_the_order_they_were_written_after_a_reopen(tmp_path: Path):
    first = Spool(tmp_path / "w1")
    for epoch in (1, 2):
        first.append("report", 11, "s", 1, report(epoch))
    first.close()

    second = Spool(tmp_path / "w1")
    second.append("complete", 11, "s", 1, complete())

    entries = second.entries()
    assert [(entry.call, entry.body.get("epoch")) for entry in entries] == [
        ("report", 1), ("report", 2), ("complete", None)]
    assert [entry.sequence for entry in entries] == [1, 2, 3]
    assert entries[1].body == report(2).model_dump(mode="json")
    second.close()


def test_completions_reach_the_disk_before_append_returns_and_reports_need_not(
    spool: Spool, monkeypatch
):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")).name)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    spool.append("report", 11, "s", 1, report(1))
    spool.append("complete", 11, "s", 1, complete())
    spool.append("fail", 12, "s", 2, {"lease_id": "lease-2", "error": "boom"})
    # Synced under their temporary names, before the rename that makes them entries.
    assert synced == [".000000000002-complete.json.tmp", ".000000000003-fail.json.tmp"]


def test_a_spool_folder_is_held_by_one_live_process_at_a_time(spool: Spool):
    with pytest.raises(SpoolBusy, match="--worker-id"):
        Spool(spool.folder)

    spool.close()
    Spool(spool.folder).close()


def test_delivered_result_leaves_the_spool_and_returns_the_answer(spool: Spool):
    server = FakeServer()
    outbox = Outbox(spool, server)

    delivery = outbox.send("report", assignment(), report(1))

    assert delivery.answer == protocol.Decision(action="continue")
    assert (delivery.ended, delivery.lease_lost, delivery.waiting) == (None, False, 0)
    assert len(spool) == 0


def test_results_wait_while_the_server_is_away_and_go_out_in_order(spool: Spool, caplog):
    server = FakeServer()
    outbox = Outbox(spool, server)
    trial = assignment()
    outbox.send("report", trial, report(1))
    server.down = True

    with caplog.at_level(logging.INFO, logger="worker.spool"):
        waiting = [outbox.send("report", trial, report(2)),
                   outbox.send("report", trial, report(3)),
                   outbox.send("complete", trial, complete())]
        server.down = False
        delivered = outbox.deliver()

    assert [delivery.answer for delivery in waiting] == [None, None, None]
    assert [delivery.waiting for delivery in waiting] == [1, 2, 3]
    assert server.calls == [("report", 14, 1), ("report", 14, 2), ("report", 14, 3),
                            ("complete", 14, None)]
    assert len(delivered) == 3 and len(spool) == 0
    assert caplog.text.count("server unreachable") == 1
    assert "spooled epoch 2 report delivered" in caplog.text


def test_lease_lost_drops_the_entry_with_a_warning_and_the_rest_still_go(
    spool: Spool, caplog
):
    server = FakeServer()
    server.answers[("report", 1)] = LeaseLost("the trial went to another worker")
    outbox = Outbox(spool, server)
    old = assignment(lease_id="old-lease", number=1)

    with caplog.at_level(logging.WARNING, logger="worker.spool"):
        lost = outbox.send("report", old, report(1, "old-lease"))
        other = outbox.send("report", assignment(), report(2))

    assert lost.lease_lost and lost.answer is None
    assert other.answer is not None and not other.lease_lost
    assert "epoch 1 report dropped: the trial went to another worker" in caplog.text
    assert len(spool) == 0


def test_refused_result_is_dropped_with_an_error(spool: Spool, caplog):
    server = FakeServer()
    server.answers[("complete", None)] = ServerError("/complete refused with 404")
    outbox = Outbox(spool, server)

    with caplog.at_level(logging.ERROR, logger="worker.spool"):
        delivery = outbox.send("complete", assignment(), complete())

    assert delivery.answer is None and len(spool) == 0
    assert "completion refused by the server and dropped" in caplog.text


def test_result_refused_for_the_token_stays_and_drain_says_why(spool: Spool):
    server = FakeServer()
    server.answers[("complete", None)] = ServerError("/complete refused with 401", 401)
    outbox = Outbox(spool, server)

    delivery = outbox.send("complete", assignment(), complete())

    assert delivery.answer is None and len(spool) == 1
    with pytest.raises(ServerError, match="401"):
        outbox.drain(threading.Event())
    assert len(spool) == 1


def test_prune_answer_to_a_spooled_report_ends_the_trial_and_drops_later_reports(
    spool: Spool
):
    server = FakeServer()
    server.answers[("report", 1)] = "prune"
    outbox = Outbox(spool, server)
    trial = assignment()
    server.down = True
    outbox.send("report", trial, report(1))
    server.down = False

    delivery = outbox.send("report", trial, report(2))
    finished = outbox.send("complete", trial, complete())

    assert delivery.ended == "prune" and delivery.answer is None
    assert server.calls == [("report", 14, 1), ("complete", 14, None)]
    assert finished.answer is not None


def test_posted_results_go_out_in_order_from_the_sender_thread_and_settle_once_tried(
    spool: Spool
):
    server = FakeServer()
    outbox = Outbox(spool, server)
    trial = assignment()
    threads: list[str] = []
    server.down = True

    away = outbox.post("report", trial, report(1),
                       on_delivery=lambda _: threads.append(threading.current_thread().name))
    first = away.wait(10)
    server.down = False
    answered = outbox.post("report", trial, report(2)).wait(10)
    finished = outbox.send("complete", trial, complete())
    outbox.close(timeout_s=10)

    assert first is not None and (first.answer, first.waiting) == (None, 1)
    assert threads and threads[0] != threading.current_thread().name
    assert answered is not None and answered.answer == protocol.Decision(action="continue")
    assert isinstance(finished.answer, protocol.Ack)
    assert server.calls == [("report", 14, 1), ("report", 14, 2), ("complete", 14, None)]
    assert len(spool) == 0


def test_posted_report_answered_prune_is_kept_with_its_epoch(spool: Spool):
    server = FakeServer()
    server.answers[("report", 2)] = "prune"
    outbox = Outbox(spool, server)
    trial = assignment()

    for epoch in (1, 2):
        outbox.post("report", trial, report(epoch)).wait(10)
    late = outbox.post("report", trial, report(3)).wait(10)
    outbox.close(timeout_s=10)

    assert outbox.ended("lease-1") == ("prune", 2)
    assert outbox.ended("lease-2") is None
    assert late is not None and (late.answer, late.ended) == (None, "prune")
    assert server.calls == [("report", 14, 1), ("report", 14, 2)]


def test_recorded_completions_and_failures_are_announced_but_reports_are_not(spool: Spool):
    recorded = []
    outbox = Outbox(spool, FakeServer(), on_recorded=lambda entry, ack: recorded.append(
        (entry.call, entry.number, ack.state)))
    trial = assignment()

    outbox.send("report", trial, report(1))
    outbox.send("complete", trial, complete())
    outbox.send("fail", trial, protocol.FailRequest(lease_id="lease-1", error="x"))

    assert recorded == [("complete", 4, "complete"), ("fail", 4, "queued")]


def test_drain_returns_when_the_spool_is_empty_or_when_told_to_stop(spool: Spool):
    server = FakeServer()
    outbox = Outbox(spool, server)
    server.down = True
    outbox.send("report", assignment(), report(1))
    stop = threading.Event()
    stop.set()

    assert outbox.drain(stop) is False and len(spool) == 1
    server.down = False
    assert outbox.drain(threading.Event()) is True and len(spool) == 0


def test_orphaned_spools_are_adopted_and_live_ones_left_alone(tmp_path: Path):
    root = tmp_path / "spool"
    dead = Spool(root / "dead-worker")
    dead.append("report", 11, "s", 1, report(3))
    dead.append("complete", 11, "s", 1, complete())
    dead.close()  # what the kernel does when the process dies, however it dies
    live = Spool(root / "live-worker")
    live.append("report", 12, "s", 2, report(1))
    mine = Spool(root / "new-worker")

    adopted = mine.adopt_orphans()

    assert adopted == 2
    assert [(entry.call, entry.trial_id) for entry in mine.entries()] == [
        ("report", 11), ("complete", 11)]
    assert not (root / "dead-worker").exists()
    assert len(live) == 1
    live.close()
    mine.close()


def test_spool_whose_folder_was_adopted_away_makes_it_again(tmp_path: Path):
    root = tmp_path / "spool"
    Spool(root / "w1").close()
    adopter = Spool(root / "w2")
    adopter.adopt_orphans()
    assert not (root / "w1").exists()

    again = Spool(root / "w1")

    assert again.folder.is_dir() and len(again) == 0
    again.close()
    adopter.close()


def test_damaged_entry_is_set_aside_and_does_not_block_delivery(spool: Spool, caplog):
    spool.append("report", 11, "s", 1, report(1))
    (spool.folder / "000000000002-report.json").write_text("{half an entry")
    spool.append("complete", 11, "s", 1, complete())
    server = FakeServer()

    with caplog.at_level(logging.ERROR, logger="worker.spool"):
        Outbox(spool, server).deliver()

    assert [call for call, _, _ in server.calls] == ["report", "complete"]
    assert "cannot be read" in caplog.text
    assert (spool.folder / ".000000000002-report.json.damaged").exists()


def worker_with(server: FakeServer, tmp_path: Path, **settings: Any) -> Worker:
    return Worker(WorkerSettings(
        worker_id="w1", device="cpu", data_dir=tmp_path / "data", max_idle_s=0,
        **settings), client=server)  # type: ignore[arg-type]


def test_worker_delivers_what_a_dead_process_left_before_it_claims(tmp_path: Path):
    left = Spool(tmp_path / "data" / "spool" / "host-123")
    left.append("report", 14, "spooled", 4, report(3))
    left.append("complete", 14, "spooled", 4, complete())
    left.close()
    server = FakeServer()

    worker_with(server, tmp_path).run()

    assert server.calls[:3] == [("report", 14, 3), ("complete", 14, None), ("claim", 0, None)]


def test_worker_trains_on_while_the_server_is_away_and_delivers_everything_after(
    tmp_path: Path, caplog
):
    server = FakeServer()
    server.claims = [assignment(epochs=3)]
    worker = worker_with(server, tmp_path, checkpoint_dir=tmp_path / "checkpoints")
    original = server.send_result

    def away_for_two_epochs(call: str, trial_id: int, body: dict, patience_s=None):
        # Away from the first report until the third epoch's report has been spooled.
        delivered = any(name != "claim" for name, _, _ in server.calls)
        server.down = not delivered and len(worker.spool) < 3
        return original(call, trial_id, body, patience_s)

    server.send_result = away_for_two_epochs  # type: ignore[method-assign]
    post = worker.outbox.post

    def post_and_let_it_be_tried(*args, **kwargs):
        # Reports go out from the outbox's sender thread while training goes on; the
        # outage above is counted in passes, one per report, so each report's pass is let
        # run before the next epoch ends.
        posted = post(*args, **kwargs)
        posted.wait(10)
        return posted

    worker.outbox.post = post_and_let_it_be_tried  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO):
        assert worker.run() == 1

    assert [(call, epoch) for call, _, epoch in server.calls
            if not call.startswith("claim")] == [
        ("report", 1), ("report", 2), ("report", 3), ("complete", None)]
    assert "spooled (1 waiting); training goes on" in caplog.text
    assert not (tmp_path / "checkpoints" / "spooled" / "trial-4.pt").exists()
    assert "spooled epoch 2 report delivered" in caplog.text
    assert "spooled epoch 3 report delivered" not in caplog.text
    assert list((tmp_path / "data" / "spool" / "w1").glob("*.json")) == []


def test_worker_waits_out_an_unreachable_server_when_claiming(tmp_path: Path, caplog):
    server = FakeServer()
    original = server.claim
    failures = [ServerUnreachable("connection refused")] * 2

    def claim_after_an_outage(request, patience_s=None):
        if failures:
            raise failures.pop()
        return original(request, patience_s)

    server.claim = claim_after_an_outage  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="worker.loop"):
        assert worker_with(server, tmp_path).run() == 0

    assert caplog.text.count("cannot claim") == 1
    assert "reaches the server again" in caplog.text


def test_worker_claims_its_next_trial_with_each_completion(tmp_path: Path):
    server = FakeServer()
    server.claims = [assignment("lease-1", number=4, epochs=1),
                     assignment("lease-2", number=5, epochs=1)]

    assert worker_with(server, tmp_path).run() == 2

    assert [(call, trial_id) for call, trial_id, _ in server.calls] == [
        ("claim", 0), ("report", 14), ("complete", 14), ("claim with the completion", 14),
        ("report", 15), ("complete", 15), ("claim with the completion", 15),
    ]  # the last completion's claim got nothing: with max_idle_s 0 the worker leaves


def test_completion_that_waited_in_the_spool_goes_without_a_claim(spool: Spool):
    server = FakeServer()
    server.down = True
    outbox = Outbox(spool, server)  # type: ignore[arg-type]
    claim = protocol.ClaimRequest(worker_id="w1")

    # Tried and unanswered; then listed behind a report that was not answered.
    tried = outbox.send("complete", assignment(), complete(), claim_next=claim)
    outbox.post("report", assignment("lease-2", number=5), report(1, "lease-2")).wait(10)
    not_reached = outbox.send("complete", assignment("lease-2", number=5),
                              complete("lease-2"), claim_next=claim)
    server.down = False
    outbox.deliver()

    assert tried.answer is None and not_reached.answer is None
    # No "claim with the completion": each completion went out after it had waited.
    assert server.calls == [("complete", 14, None), ("report", 15, 1), ("complete", 15, None)]
    outbox.close()


def test_worker_told_to_leave_hands_back_a_trial_claimed_with_its_completion(tmp_path: Path):
    server = FakeServer()
    server.claims = [assignment("lease-1", number=4, epochs=1),
                     assignment("lease-2", number=5, epochs=1)]
    worker = worker_with(server, tmp_path)
    send_result = server.send_result

    def leave_while_completing(call: str, trial_id: int, body: dict, patience_s=None):
        answer = send_result(call, trial_id, body, patience_s)
        if call == "complete":
            worker.shutdown.set()  # the signal comes while the completion is answered
        return answer

    server.send_result = leave_while_completing  # type: ignore[method-assign]
    assert worker.run() == 1

    assert [(call, trial_id) for call, trial_id, _ in server.calls][-2:] == [
        ("claim with the completion", 14), ("fail", 15)]


def test_server_without_claim_next_gets_the_completion_and_later_claims_apart(tmp_path: Path):
    server = FakeServer()
    server.claims = [assignment("lease-1", number=4, epochs=1),
                     assignment("lease-2", number=5, epochs=1)]
    send_result = server.send_result

    def older_server(call: str, trial_id: int, body: dict, patience_s=None):
        if body.get("claim_next") is not None:  # a server before claim_next answers so
            server.calls.append(("refused: claim_next", trial_id, None))
            raise ServerError("body.claim_next: Extra inputs are not permitted", 422)
        return send_result(call, trial_id, body, patience_s)

    server.send_result = older_server  # type: ignore[method-assign]
    assert worker_with(server, tmp_path).run() == 2

    assert [(call, trial_id) for call, trial_id, _ in server.calls] == [
        ("claim", 0), ("report", 14), ("refused: claim_next", 14), ("complete", 14),
        ("claim", 0), ("report", 15), ("complete", 15), ("claim", 0),
    ]


def test_a_completion_without_a_claim_sends_the_body_servers_before_claim_next_read():
    sent: list[dict] = []

    def server(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"recorded": True, "state": "complete"})

    client = WorkerClient("http://server")
    client._http = httpx.Client(base_url="http://server/api/v1/worker",
                                transport=httpx.MockTransport(server))
    client.complete(14, complete())
    client.complete(14, complete().model_copy(
        update={"claim_next": protocol.ClaimRequest(worker_id="w1")}))

    assert sent[0] == {"lease_id": "lease-1", "value": 0.25, "pruned": False,
                       "stopped": False}
    assert sent[1]["claim_next"]["worker_id"] == "w1"
