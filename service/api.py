"""REST routes. Each parses the request, calls one domain function in one unit of work,
and returns its answer; the rules and the SQL live in `service.domain`."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy.orm import Session, sessionmaker

from clrsearch import protocol
from clrsearch.spec import RangeTestSpec, StudySpec, TaskSpec
from service import domain
from service.db import unit_of_work
from service.errors import InvalidRequest, Unauthorized
from service.optuna_bridge import OptunaBridge
from service.preview import PreviewRequest, SchedulePreview, preview_schedule
from service.schemas import (
    RangeTestView,
    StudyDetail,
    StudySummary,
    TrialDetail,
    TrialPage,
    TrialSummary,
    WorkerView,
)
from service.settings import ServerSettings

# Ids and numbers live in 32-bit integer columns; larger ones cannot name anything.
RowId = Annotated[int, Path(ge=0, le=2**31 - 1)]
StudyName = Annotated[str, Path(min_length=1, max_length=100)]
Role = Literal["read", "admin", "worker"]
TrialState = Literal["queued", "running", "complete", "pruned", "failed", "stopped"]

bearer = HTTPBearer(auto_error=False)


# The dependencies are `async def` because they never block: FastAPI runs a plain `def`
# dependency on the thread pool, a thread hop per dependency per request.
async def _settings(request: Request) -> ServerSettings:
    return request.app.state.settings


async def _bridge(request: Request) -> OptunaBridge:
    return request.app.state.bridge


async def _sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def _token_matches(given: str, expected: object) -> bool:
    # Constant-time comparison, so response timing does not leak the token.
    return expected is not None and hmac.compare_digest(
        given.encode(), expected.get_secret_value().encode()  # type: ignore[attr-defined]
    )


def require(role: Role) -> Callable[..., None]:
    """A dependency that admits a request carrying a token good for `role`.

    With no tokens configured (the local default) every route is open. Admin tokens
    are good for every route; worker tokens only for the worker protocol; read tokens
    for GET routes.
    """

    async def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        settings: ServerSettings = request.app.state.settings
        if role == "read" and settings.read_token is None:
            return  # reads are open unless a read token is configured
        accepted = {
            "admin": [settings.admin_token],
            "worker": [settings.worker_token, settings.admin_token],
            "read": [settings.read_token, settings.admin_token],
        }[role]
        if all(token is None for token in accepted):
            return  # no token configured for this role: the open local default
        if credentials is None:
            raise Unauthorized(f"this route needs a bearer token with {role} access")
        if not any(_token_matches(credentials.credentials, token) for token in accepted):
            raise Unauthorized(f"the token given does not grant {role} access", 403)

    return check


# Each route opens its unit of work itself and commits before it returns. A yield
# dependency would commit after FastAPI has checked the answer, which it does on a
# thread-pool thread: with every thread waiting for a lock this transaction holds, the
# server would deadlock; and a client could see a claim other processes cannot read yet.
SessionsDep = Annotated[sessionmaker[Session], Depends(_sessions)]
BridgeDep = Annotated[OptunaBridge, Depends(_bridge)]
SettingsDep = Annotated[ServerSettings, Depends(_settings)]

studies = APIRouter(prefix="/api/v1", tags=["studies"])
workers = APIRouter(prefix="/api/v1/worker", tags=["worker protocol"],
                    dependencies=[Depends(require("worker"))])


@studies.post("/studies", status_code=201, dependencies=[Depends(require("admin"))])
def create_study(spec: StudySpec, sessions: SessionsDep, bridge: BridgeDep) -> StudyDetail:
    """Submit a study; the answer holds the full spec with every default filled in."""
    with unit_of_work(sessions) as session:
        return domain.create_study(session, bridge, spec)


@studies.get("/studies", dependencies=[Depends(require("read"))])
def list_studies(sessions: SessionsDep) -> list[StudySummary]:
    with unit_of_work(sessions) as session:
        return domain.list_studies(session)


@studies.get("/studies/{name}", dependencies=[Depends(require("read"))])
def get_study(name: StudyName, sessions: SessionsDep) -> StudyDetail:
    with unit_of_work(sessions) as session:
        return domain.get_study(session, name)


@studies.post("/studies/{name}/stop", dependencies=[Depends(require("admin"))])
def stop_study(name: StudyName, sessions: SessionsDep, bridge: BridgeDep) -> StudyDetail:
    """Stop a study: queued trials end now, running ones at their next call."""
    with unit_of_work(sessions) as session:
        return domain.stop_study(session, bridge, name)


@studies.get("/studies/{name}/trials", dependencies=[Depends(require("read"))])
def list_trials(
    name: StudyName,
    sessions: SessionsDep,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    state: TrialState | None = None,
) -> TrialPage:
    with unit_of_work(sessions) as session:
        return domain.list_trials(session, name, offset=offset, limit=limit, state=state)


@studies.get("/studies/{name}/best", dependencies=[Depends(require("read"))])
def best_trial(name: StudyName, sessions: SessionsDep) -> TrialSummary:
    with unit_of_work(sessions) as session:
        return domain.best_trial(session, name)


@studies.get("/studies/{name}/trials/{number}", dependencies=[Depends(require("read"))])
def get_trial(
    name: StudyName,
    number: RowId,
    sessions: SessionsDep,
    max_points: Annotated[int, Query(ge=2, le=100_000)] = domain.DEFAULT_TRACE_POINTS,
) -> TrialDetail:
    """One trial with its per-epoch curve and the LR and momentum it ran at each step."""
    with unit_of_work(sessions) as session:
        return domain.get_trial(session, name, number, max_points)


class RangeTestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    task: TaskSpec = TaskSpec()
    range_test: RangeTestSpec = RangeTestSpec()


@studies.post("/range-tests", status_code=201, dependencies=[Depends(require("admin"))])
def create_range_test(body: RangeTestRequest, sessions: SessionsDep,
                      bridge: BridgeDep) -> StudyDetail:
    """Run an LR range test on its own: a study of that name with the range test only.
    A worker runs it; read the curve and bounds at /studies/{name}/range-test."""
    try:
        spec = StudySpec(name=body.name, task=body.task, range_test=body.range_test,
                         lr_bounds="auto", n_trials=0)
    except ValidationError as error:  # the name is checked by the spec's rules
        raise InvalidRequest("; ".join(
            f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors()
        )) from error
    with unit_of_work(sessions) as session:
        return domain.create_study(session, bridge, spec)


@studies.get("/studies/{name}/range-test", dependencies=[Depends(require("read"))])
def get_range_test(
    name: StudyName, sessions: SessionsDep,
    max_points: Annotated[int, Query(ge=2, le=100_000)] = domain.DEFAULT_TRACE_POINTS,
) -> RangeTestView:
    """The study's LR range test: smoothed loss against LR, and the bounds read off it."""
    with unit_of_work(sessions) as session:
        return domain.get_range_test(session, name, max_points)


@studies.get("/workers", dependencies=[Depends(require("read"))])
def list_workers(sessions: SessionsDep) -> list[WorkerView]:
    with unit_of_work(sessions) as session:
        return domain.list_workers(session)


# The worker protocol's routes are the hot path: hundreds of calls a minute on a busy
# study. They take the app's state from the request instead of through three
# dependencies, and return their JSON themselves: FastAPI passes a Response through
# without validating and serialising the answer a second time (`response_model` still
# documents it in the OpenAPI schema).
def _state(request: Request) -> tuple[sessionmaker[Session], OptunaBridge, ServerSettings]:
    state = request.app.state
    return state.sessions, state.bridge, state.settings


def _json(answer: BaseModel) -> Response:
    return Response(answer.model_dump_json(), media_type="application/json")


@workers.post("/claim", response_model=protocol.ClaimResponse)
def claim(body: protocol.ClaimRequest, request: Request) -> Response:
    return _json(_claim(body, *_state(request)))


def _claim(body: protocol.ClaimRequest, sessions: sessionmaker[Session], bridge: OptunaBridge,
           settings: ServerSettings) -> protocol.ClaimResponse:
    with unit_of_work(sessions) as session:
        to_sample = domain.study_to_sample(session)
    return _claim_sampling(body, to_sample, sessions, bridge, settings)


def _claim_sampling(
    body: protocol.ClaimRequest, to_sample: StudySpec | None, sessions: sessionmaker[Session],
    bridge: OptunaBridge, settings: ServerSettings,
) -> protocol.ClaimResponse:
    """A claim, once `domain.study_to_sample` has been read in a committed transaction."""
    # The sampler works between two transactions, holding no lock, so that reports and
    # other claims need not wait for it (OptunaBridge.propose).
    proposal = bridge.next_proposal(to_sample) if to_sample is not None else None
    with unit_of_work(sessions) as session:
        return domain.claim(session, bridge, settings, body, proposal)


@workers.post("/trials/{trial_id}/heartbeat", response_model=protocol.Decision)
def heartbeat(trial_id: RowId, body: protocol.HeartbeatRequest, request: Request) -> Response:
    sessions, _, settings = _state(request)
    with unit_of_work(sessions) as session:
        answer = domain.heartbeat(session, settings, trial_id, body)
    return _json(answer)


@workers.post("/trials/{trial_id}/report", response_model=protocol.Decision)
def report(trial_id: RowId, body: protocol.EpochReport, request: Request) -> Response:
    sessions, bridge, settings = _state(request)
    with unit_of_work(sessions) as session:
        answer = domain.report(session, bridge, settings, trial_id, body)
    return _json(answer)


@workers.post("/trials/{trial_id}/complete", response_model=protocol.Ack)
def complete(trial_id: RowId, body: protocol.CompleteRequest, request: Request) -> Response:
    """Record a trial's end; with `claim_next`, then claim the worker's next trial."""
    sessions, bridge, settings = _state(request)
    with unit_of_work(sessions) as session:
        answer = domain.complete(session, bridge, settings, trial_id, body)
        # The claim's first question, asked in this transaction rather than one more.
        to_sample = domain.study_to_sample(session) if body.claim_next is not None else None
    if body.claim_next is None:
        # The answer as it was before `claim_next`, for workers that do not send it.
        return Response(answer.model_dump_json(exclude={"next"}),
                        media_type="application/json")
    # After the completion's commit: the sampler sees this trial's result, and a failed
    # claim loses nothing (a retried completion is a repeat, its claim a new one).
    answer.next = _claim_sampling(body.claim_next, to_sample, sessions, bridge, settings)
    return _json(answer)


@workers.post("/trials/{trial_id}/fail", response_model=protocol.Ack)
def fail(trial_id: RowId, body: protocol.FailRequest, request: Request) -> Response:
    sessions, bridge, settings = _state(request)
    with unit_of_work(sessions) as session:
        answer = domain.fail(session, bridge, settings, trial_id, body)
    return _json(answer)


@studies.post("/schedule/preview", dependencies=[Depends(require("read"))])
def schedule_preview(body: PreviewRequest) -> SchedulePreview:
    """The LR and momentum at each iteration for given CyclicLR parameters and task,
    computed with torch's `CyclicLR` exactly as a worker would run it."""
    return preview_schedule(body)
