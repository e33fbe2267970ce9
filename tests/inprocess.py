"""What one server process holds, without HTTP: an engine, its sessions and its Optuna
bridge, driven through the domain functions the routes call. For tests of how several
server processes share Optuna's journal, each `InProcessServer` being one process."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from clrsearch import protocol
from service import domain
from service.db import make_engine, make_sessionmaker, unit_of_work
from service.optuna_bridge import OptunaBridge
from service.proposer import AskAhead
from service.settings import ServerSettings


class InProcessServer:
    def __init__(self, database_url: str, ask_ahead: bool = False) -> None:
        self.engine = make_engine(database_url)
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.engine)
        self.ask_ahead = AskAhead(database_url) if ask_ahead else None
        self.bridge = OptunaBridge(self.engine, self.ask_ahead)
        self.settings = ServerSettings(database_url=database_url)

    def claim(self, worker_id: str, sample_first: bool = False) -> protocol.TrialAssignment:
        """A claim; with `sample_first`, as the claim route makes it: the sampler's
        proposal first, outside the journal's lock."""
        proposal = None
        if sample_first:
            with unit_of_work(self.sessions) as session:
                spec = domain.study_to_sample(session)
            proposal = self.bridge.next_proposal(spec) if spec is not None else None
        with unit_of_work(self.sessions) as session:
            answer = domain.claim(session, self.bridge, self.settings,
                                  protocol.ClaimRequest(worker_id=worker_id), proposal)
        assert answer.trial is not None
        return answer.trial

    def report(self, trial: protocol.TrialAssignment, epoch: int, value: float) -> str:
        body = protocol.EpochReport(
            lease_id=trial.lease_id, epoch=epoch, iterations=10 * epoch, train_loss=value,
            val_loss=value, val_accuracy=0.5, duration_s=0.1,
        )
        with unit_of_work(self.sessions) as session:
            return domain.report(session, self.bridge, self.settings, trial.trial_id,
                                 body).action

    def complete(self, trial: protocol.TrialAssignment, value: float) -> None:
        with unit_of_work(self.sessions) as session:
            domain.complete(session, self.bridge, self.settings, trial.trial_id,
                            protocol.CompleteRequest(lease_id=trial.lease_id, value=value))

    def close(self) -> None:
        self.bridge.close()
        self.engine.dispose()
