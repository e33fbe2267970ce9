"""Optuna's journal is written in the request's transaction, under a lock taken first.

These tests drive `domain` and `OptunaBridge` directly, as two server processes would
(two bridges on one database), and read Optuna's data back the way a tool would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import optuna
import pytest

from clrsearch import protocol
from clrsearch.spec import StudySpec
from service import domain
from service.db import unit_of_work
from service.migrations import upgrade_database
from service.optuna_bridge import optuna_storage
from tests.inprocess import InProcessServer

SPEC = {
    "name": "journal",
    "n_trials": 6,
    "parallelism": 6,
    "space": {"max_lr": {"low": 0.01, "high": 1.0, "log": True},
              "lr_ratio": {"low": 2.0, "high": 10.0}},
    "task": {"epochs": 3},
    "pruner": "none",
}


@pytest.fixture
def servers(database_url: str) -> Iterator[tuple[InProcessServer, InProcessServer]]:
    upgrade_database(database_url)
    first, second = InProcessServer(database_url), InProcessServer(database_url)
    with unit_of_work(first.sessions) as session:
        domain.create_study(session, first.bridge, StudySpec.model_validate(SPEC))
    yield first, second
    first.close()
    second.close()


def optuna_trials(database_url: str) -> list[optuna.trial.FrozenTrial]:
    with optuna_storage(database_url) as storage:
        return optuna.load_study(study_name="journal", storage=storage).get_trials()


def test_a_rolled_back_claim_leaves_no_optuna_trial_behind(servers, database_url) -> None:
    first, _ = servers
    session = first.sessions()
    answer = domain.claim(session, first.bridge, first.settings,
                          protocol.ClaimRequest(worker_id="w1"))
    assert answer.trial is not None
    session.rollback()  # as when the commit fails, or the server dies before it
    session.close()

    assert optuna_trials(database_url) == []
    # The bridge dropped the ask it had applied in memory: the next trial is number 0.
    trial = first.claim("w1")
    assert trial.number == 0
    assert [t.number for t in optuna_trials(database_url)] == [0]
    assert optuna_trials(database_url)[0].params["max_lr"] == pytest.approx(trial.params.max_lr)


def test_two_servers_number_trials_in_one_order_and_see_each_others_reports(
    servers, database_url
) -> None:
    first, second = servers
    trials = [server.claim(f"w{index}")
              for index, server in enumerate([first, second, first, second])]
    assert [trial.number for trial in trials] == [0, 1, 2, 3]
    # Each server reports on the other's trials; the journal keeps every value once.
    for epoch in (1, 2):
        for index, trial in enumerate(trials):
            server = second if index % 2 == 0 else first
            assert server.report(trial, epoch, 1.0 / (index + epoch)) == "continue"
    stored = optuna_trials(database_url)
    assert [t.number for t in stored] == [0, 1, 2, 3]
    for index, trial in enumerate(stored):
        assert trial.intermediate_values == {1: 1.0 / (index + 1), 2: 1.0 / (index + 2)}
        assert trial.params["max_lr"] == pytest.approx(trials[index].params.max_lr)


def test_optunas_data_cannot_change_without_the_journals_lock(servers) -> None:
    first, _ = servers
    spec = StudySpec.model_validate(SPEC)
    with pytest.raises(RuntimeError, match="lock_journal"):
        first.bridge.ask(spec)
    with unit_of_work(first.sessions) as session:
        first.bridge.lock_journal(session)
        first.bridge.ask(spec)
    # Released at commit: a read-only call from another thread is not kept waiting.
    assert first.bridge._lock.acquire(timeout=1)
    first.bridge._lock.release()


def test_a_journal_from_the_old_second_sqlite_file_is_copied_in(tmp_path) -> None:
    old_url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade_database(old_url)
    old = InProcessServer(old_url)
    with unit_of_work(old.sessions) as session:
        domain.create_study(session, old.bridge, StudySpec.model_validate(SPEC))
    old.claim("w1")
    old.close()
    lines = _journal_lines(tmp_path / "old.db")
    assert lines
    # An earlier version kept the same table in `<name>-optuna.db` beside the main file.
    legacy = sqlite3.connect(tmp_path / "moved-optuna.db")
    legacy.execute("CREATE TABLE optuna_journal (log_number BIGINT PRIMARY KEY, "
                   "entry TEXT NOT NULL)")
    legacy.executemany("INSERT INTO optuna_journal VALUES (?, ?)", lines)
    legacy.commit()
    legacy.close()

    upgrade_database(f"sqlite:///{tmp_path / 'moved.db'}")
    assert _journal_lines(tmp_path / "moved.db") == lines
    upgrade_database(f"sqlite:///{tmp_path / 'moved.db'}")  # a second start copies nothing
    assert _journal_lines(tmp_path / "moved.db") == lines


def _journal_lines(path: Any) -> list[tuple[int, str]]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(
            "SELECT log_number, entry FROM optuna_journal ORDER BY log_number").fetchall()
    finally:
        connection.close()


def test_a_proposal_sampled_outside_the_lock_is_what_the_claim_hands_out(
    servers, monkeypatch
) -> None:
    first, _ = servers
    spec = StudySpec.model_validate(SPEC)
    proposal = first.bridge.propose(spec)
    assert proposal is not None and proposal.number == 0

    def no_sampling(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the sampler ran under the journal's lock")

    sampler = first.bridge._studies["journal"].sampler
    monkeypatch.setattr(sampler, "sample_relative", no_sampling)
    monkeypatch.setattr(sampler, "sample_independent", no_sampling)
    trial = claim_with(first, "w1", proposal)
    assert trial.number == 0 and trial.params == proposal.params


def test_a_proposal_overtaken_by_another_claim_gives_the_next_trial_its_settings(
    servers, database_url
) -> None:
    first, second = servers
    stale = first.bridge.propose(StudySpec.model_validate(SPEC))
    assert stale is not None and stale.number == 0
    second.claim("w2")  # trial 0, asked by the other server meanwhile
    trial = claim_with(first, "w1", stale)
    assert trial.number == 1 and trial.params == stale.params
    stored = optuna_trials(database_url)
    assert [t.number for t in stored] == [0, 1]
    assert stored[1].params["max_lr"] == pytest.approx(stale.params.max_lr)


def claim_with(server: InProcessServer, worker_id: str, proposal: Any
               ) -> protocol.TrialAssignment:
    with unit_of_work(server.sessions) as session:
        trial = domain.claim(session, server.bridge, server.settings,
                             protocol.ClaimRequest(worker_id=worker_id), proposal).trial
    assert trial is not None
    return trial
