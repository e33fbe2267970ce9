"""Ask-ahead: a second process drafts each study's next trial before it is claimed.

These tests drive `domain` and `OptunaBridge` with a real proposer process on a real
database, as the server does, and read Optuna's data back the way a tool would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import optuna
import pytest

from clrsearch import protocol
from clrsearch.spec import CyclicParams, StudySpec
from service import domain, proposer
from service.db import unit_of_work
from service.migrations import upgrade_database
from service.optuna_bridge import Proposal, optuna_storage, read_only_storage
from service.proposer import AskAhead
from tests.inprocess import InProcessServer

SPEC = {
    "name": "ahead",
    "n_trials": 8,
    "parallelism": 1,
    "space": {"max_lr": {"low": 0.01, "high": 1.0, "log": True},
              "lr_ratio": {"low": 2.0, "high": 10.0}},
    "task": {"epochs": 2},
    "pruner": "none",
}


def run_trial(server: InProcessServer, worker_id: str, value: float
              ) -> protocol.TrialAssignment:
    """Claim as the claim route does (the proposal first, outside the lock), complete."""
    trial = server.claim(worker_id, sample_first=True)
    server.complete(trial, value)
    return trial


@pytest.fixture
def server(database_url: str) -> Iterator[InProcessServer]:
    upgrade_database(database_url)
    server = InProcessServer(database_url, ask_ahead=True)
    with unit_of_work(server.sessions) as session:
        domain.create_study(session, server.bridge, StudySpec.model_validate(SPEC))
    # The study's creation asked for its first draft.
    assert server.ask_ahead.wait_until_answering(60)
    yield server
    server.close()


def test_claims_hand_out_drafted_settings_and_optuna_stores_them(server, database_url) -> None:
    trials = [run_trial(server, "w1", value=1.0 / (number + 1)) for number in range(6)]

    assert server.bridge.drafted_claims >= 5  # the first claim may come before a draft
    with optuna_storage(database_url) as storage:
        stored = optuna.load_study(study_name="ahead", storage=storage).get_trials()
    assert [t.number for t in stored] == [t.number for t in trials] == list(range(6))
    for trial, frozen in zip(trials, stored, strict=True):
        assert frozen.state == optuna.trial.TrialState.COMPLETE
        assert trial.params.max_lr == frozen.params["max_lr"]
        assert trial.params.base_lr == pytest.approx(
            frozen.params["max_lr"] / frozen.params["lr_ratio"])
    assert len({t.params.max_lr for t in trials}) == 6  # six drafts, not one handed out twice


def test_claims_sample_by_themselves_while_the_proposer_is_down_and_it_comes_back(
    server, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(proposer, "RESTART_AFTER_S", 0.0)
    run_trial(server, "w1", 0.5)
    server.ask_ahead._process.kill()
    server.ask_ahead._process.wait()

    with caplog.at_level(logging.WARNING, logger="service.proposer"):
        trial = run_trial(server, "w1", 0.4)  # served while the proposer is gone
        assert trial.number == 1
        run_trial(server, "w1", 0.3)
    assert "ask-ahead proposer stopped" in caplog.text
    assert server.ask_ahead.wait_until_answering(60)
    drafted = server.bridge.drafted_claims
    run_trial(server, "w1", 0.2)
    assert server.bridge.drafted_claims == drafted + 1


def test_a_draft_that_missed_more_than_one_finished_trial_is_not_handed_out(
    sqlite_url,
) -> None:
    ask_ahead = AskAhead(sqlite_url)  # never started: only its bookkeeping is tested
    params = CyclicParams(base_lr=0.01, max_lr=0.1, step_size_up=2.0)
    drafted_at_3 = Proposal("s", 5, {"max_lr": 0.1}, params, {}, finished=3)
    ask_ahead._studies["s"] = proposer._StudyDrafts(ready=drafted_at_3)

    assert ask_ahead.take("s", finished=5) is None
    assert ask_ahead.take("s", finished=4) is drafted_at_3
    assert ask_ahead.take("s", finished=4) is None  # handed out once


def test_the_proposer_cannot_write_optunas_journal(server, database_url) -> None:
    storage = read_only_storage(database_url)
    try:
        study = optuna.load_study(study_name="ahead", storage=storage)
        with pytest.raises(RuntimeError, match="tried to write"):
            study.ask()
    finally:
        storage._backend.close()
