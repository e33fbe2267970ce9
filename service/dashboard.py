"""The web dashboard: HTML pages and the JSON they poll.

    /dashboard                                  studies: progress, best value, stop
    /dashboard/studies/{name}                   one study: table, charts, exports
    /dashboard/studies/{name}/trials/{number}   one trial: LR and momentum per step, curves
    /dashboard/workers                          workers and the health of their leases
    /dashboard/preview                          a CyclicLR schedule drawn before it runs
    /dashboard/api/...                          what those pages fetch and poll

Each page's first response carries its data embedded as JSON, so it shows something at
once; charts then fetch their data and every page polls for changes (a cheap stamp on
the study page) and redraws without a reload. Scripts, styles and the charting library
(uPlot, vendored in `static/vendor`) are served from here: the dashboard works offline.

Routes only translate: the queries are in `service.views` (and `service.domain` for what
the REST API already answers), and Optuna is reached only through `OptunaBridge`.

Access follows the REST API: pages and their data are open unless a read token is set;
then a browser proves it with the token in a cookie (set by the token form) or a bearer
header. The stop button calls the REST API's admin route with the token as a bearer
header; a cookie is never enough to change anything.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session

from clrsearch.spec import CyclicParams, StudySpec
from service import domain, views
from service.db import unit_of_work
from service.errors import InvalidRequest, NotFound, Unauthorized
from service.optuna_bridge import OptunaBridge
from service.preview import PreviewRequest, SchedulePreview, preview_schedule
from service.settings import ServerSettings

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
TOKEN_COOKIE = "clrsearch_token"
TABLE_PAGE = 50  # rows per page of the trial table
TRACE_POINTS = 5000  # the trial page's LR trace, thinned on the server beyond this
TrialState = Literal["queued", "running", "complete", "pruned", "failed", "stopped"]

templates = Jinja2Templates(directory=HERE / "templates")
pages = APIRouter(include_in_schema=False)
data = APIRouter(prefix="/dashboard/api", tags=["dashboard"])


def install(app: FastAPI) -> None:
    """Add the dashboard's pages, its JSON routes and its static files to the server."""
    app.include_router(pages)
    app.include_router(data, dependencies=[Depends(_require_read)])
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.state.importances = _ImportanceCache()


# -- access -------------------------------------------------------------------------------


def _read_access(request: Request) -> Literal["open", "granted", "missing", "wrong"]:
    """The REST API's rule for reads, with the token also accepted from the cookie."""
    settings: ServerSettings = request.app.state.settings
    if settings.read_token is None:
        return "open"
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else ""
    # The browser sets the cookie URL-encoded (see static/dashboard.js).
    given = given or unquote(request.cookies.get(TOKEN_COOKIE, ""))
    if not given:
        return "missing"
    matches = [
        # Constant-time comparison, so response timing does not leak the token.
        hmac.compare_digest(given.encode(), token.get_secret_value().encode())
        for token in (settings.read_token, settings.admin_token) if token is not None
    ]
    return "granted" if any(matches) else "wrong"


def _require_read(request: Request) -> None:
    access = _read_access(request)
    if access == "missing":
        raise Unauthorized("the dashboard needs a read or admin token (bearer or cookie)")
    if access == "wrong":
        raise Unauthorized("the token given does not grant read access", 403)


# -- pages --------------------------------------------------------------------------------


@pages.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@pages.get("/dashboard", response_class=HTMLResponse)
def studies_page(request: Request) -> Response:
    def build(session: Session) -> dict[str, Any]:
        return {"studies": [study.model_dump(mode="json")
                            for study in domain.list_studies(session)]}

    return _page(request, "studies.html", "Studies", build)


@pages.get("/dashboard/studies/{name}", response_class=HTMLResponse)
def study_page(
    request: Request, name: str, page_size: Annotated[int, Query(ge=1, le=500)] = TABLE_PAGE
) -> Response:
    def build(session: Session) -> dict[str, Any]:
        live = views.study_live(session, name)
        table = views.trial_table(session, name, limit=page_size)
        return {"live": live.model_dump(mode="json"), "table": table.model_dump(mode="json")}

    return _page(request, "study.html", name, build, study_name=name)


@pages.get("/dashboard/studies/{name}/trials/{number}", response_class=HTMLResponse)
def trial_page(request: Request, name: str, number: int) -> Response:
    def build(session: Session) -> dict[str, Any]:
        trial = domain.get_trial(session, name, number, max_points=TRACE_POINTS)
        study = domain.get_study(session, name)
        # The task lets the page ask for the predicted schedule of a trial not yet run.
        return {"trial": trial.model_dump(mode="json"), "task": study.spec["task"],
                "objective": study.objective, "direction": study.direction}

    return _page(request, "trial.html", f"{name} · trial {number}", build,
                 study_name=name, number=number)


@pages.get("/dashboard/workers", response_class=HTMLResponse)
def workers_page(request: Request) -> Response:
    settings: ServerSettings = request.app.state.settings

    def build(session: Session) -> dict[str, Any]:
        workers = views.workers_with_leases(session, settings)
        return {"workers": [worker.model_dump(mode="json") for worker in workers],
                "lease_s": settings.lease_s, "heartbeat_s": settings.heartbeat_s}

    return _page(request, "workers.html", "Workers", build)


@pages.get("/dashboard/preview", response_class=HTMLResponse)
def preview_page(request: Request) -> Response:
    """A form for CyclicLR settings and a task, drawn by the schedule preview endpoint."""
    return _page(request, "preview.html", "Schedule preview", lambda session: {})


def _page(
    request: Request, template: str, title: str,
    build: Callable[[Session], dict[str, Any]], **context: Any,
) -> Response:
    """Render a page with its data, or the token form, or a page saying what is missing."""
    access = _read_access(request)
    if access in ("missing", "wrong"):
        return templates.TemplateResponse(
            request, "token.html", {"title": "Token needed", "wrong": access == "wrong"},
            status_code=401 if access == "missing" else 403,
        )
    try:
        with unit_of_work(request.app.state.sessions) as session:
            initial = build(session)
    except NotFound as error:
        return templates.TemplateResponse(
            request, "missing.html", {"title": "Not found", "message": str(error)},
            status_code=404,
        )
    return templates.TemplateResponse(
        request, template, {"title": title, "initial": initial, **context}
    )


# -- data the pages fetch -----------------------------------------------------------------


def _sessions(request: Request):
    return request.app.state.sessions


@data.get("/studies/{name}/live")
def study_live(request: Request, name: str) -> views.StudyLive:
    """The study page's header and a stamp that changes whenever its data may have."""
    with unit_of_work(_sessions(request)) as session:
        return views.study_live(session, name)


@data.get("/studies/{name}/trials")
def trial_table(
    request: Request,
    name: str,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = TABLE_PAGE,
    state: TrialState | None = None,
    sort: Annotated[str, Query(description="a column: number, value, params.max_lr, ...")]
    = "number",
    order: Literal["asc", "desc"] = "desc",
) -> views.TrialTable:
    """One page of the trial table, sorted and filtered on the server."""
    with unit_of_work(_sessions(request)) as session:
        return views.trial_table(session, name, offset=offset, limit=limit, state=state,
                                 sort=sort, descending=order == "desc")


@data.get("/studies/{name}/history")
def history(request: Request, name: str) -> views.History:
    with unit_of_work(_sessions(request)) as session:
        return views.history(session, name)


@data.get("/studies/{name}/curves")
def learning_curves(
    request: Request, name: str, metric: views.Metric = "val_loss",
    max_trials: Annotated[int, Query(ge=1, le=2000)] = 300,
) -> views.Curves:
    with unit_of_work(_sessions(request)) as session:
        return views.learning_curves(session, name, metric, max_trials)


@data.get("/studies/{name}/schedules")
def top_schedules(
    request: Request, name: str, top: Annotated[int, Query(ge=1, le=20)] = 5,
    max_points: Annotated[int, Query(ge=2, le=20_000)] = 1000,
) -> views.Schedules:
    with unit_of_work(_sessions(request)) as session:
        return views.top_schedules(session, name, top, max_points)


@data.get("/studies/{name}/parallel")
def parallel_coordinates(
    request: Request, name: str, max_trials: Annotated[int, Query(ge=1, le=20_000)] = 2000,
) -> views.Parallel:
    with unit_of_work(_sessions(request)) as session:
        return views.parallel_coordinates(session, name, max_trials)


@data.get("/studies/{name}/comparison")
def baseline_comparison(request: Request, name: str) -> views.Comparison | None:
    """Best CyclicLR against best baseline; null while the study has no baseline run."""
    with unit_of_work(_sessions(request)) as session:
        return views.baseline_comparison(session, name)


@data.get("/studies/{name}/importances")
def importances(request: Request, name: str) -> dict[str, Any]:
    """Parameter importances from Optuna's own evaluator, recomputed when a trial completes."""
    with unit_of_work(_sessions(request)) as session:
        spec, complete = views.importance_spec(session, name)
    # Optuna runs outside the transaction: on SQLite every transaction holds the write
    # lock, and workers must not wait for an importance fit.
    bridge: OptunaBridge = request.app.state.bridge
    return request.app.state.importances.get(bridge, spec, complete)


@data.get("/studies/{name}/export.csv")
def export_csv(request: Request, name: str) -> Response:
    with unit_of_work(_sessions(request)) as session:
        rows = views.export_rows(session, name)
    return Response(
        views.export_csv(rows), media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}-trials.csv"'},
    )


@data.get("/studies/{name}/export.json")
def export_json(request: Request, name: str) -> JSONResponse:
    with unit_of_work(_sessions(request)) as session:
        rows = views.export_rows(session, name)
    return JSONResponse(
        {"study": name, "trials": rows},
        headers={"Content-Disposition": f'attachment; filename="{name}-trials.json"'},
    )


class SpecPreviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: StudySpec
    # As for POST /api/v1/schedule/preview: imagefolder data needs it.
    batches_per_epoch: int | None = Field(None, ge=1, le=10_000_000)
    max_points: int = Field(2000, ge=2, le=100_000)


class SpecPreview(BaseModel):
    """The schedule a spec's centre trial would run, and those settings."""

    params: CyclicParams
    preview: SchedulePreview


@data.post("/preview/spec")
def preview_spec(body: SpecPreviewRequest) -> SpecPreview:
    """Preview a study spec before it is submitted, at the centre of its space."""
    try:
        params = views.spec_centre(body.spec)
    except ValidationError as error:  # a centre the per-trial rules refuse
        raise InvalidRequest("; ".join(
            f"{'.'.join(map(str, item['loc'])) or 'params'}: {item['msg']}"
            for item in error.errors()
        )) from error
    preview = preview_schedule(PreviewRequest(
        params=params, task=body.spec.task, batches_per_epoch=body.batches_per_epoch,
        max_points=body.max_points,
    ))
    return SpecPreview(params=params, preview=preview)


@data.get("/workers")
def workers(request: Request) -> list[views.WorkerHealth]:
    with unit_of_work(_sessions(request)) as session:
        return views.workers_with_leases(session, request.app.state.settings)


class _ImportanceCache:
    """Importances per study, kept until the study's count of complete trials changes.

    The study page asks on every change it sees; fitting the evaluator each time would
    cost seconds on a large study for the same answer. Per process, like the Optuna
    studies the bridge keeps: nothing here is a fact the database does not hold.
    """

    def __init__(self) -> None:
        self._answers: dict[str, tuple[int, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def get(self, bridge: OptunaBridge, spec: StudySpec, complete: int) -> dict[str, Any]:
        with self._lock:
            cached = self._answers.get(spec.name)
        if cached is not None and cached[0] == complete:
            return cached[1]
        answer: dict[str, Any] = {"complete_trials": complete, "importances": {}, "note": ""}
        if complete < 2:
            answer["note"] = "importances need at least two complete trials"
        else:
            try:
                answer["importances"] = bridge.importances(spec)
            except (ValueError, RuntimeError) as error:
                # Optuna refuses, e.g., when no parameter varies among complete trials.
                logger.warning("importances of study %r not computed: %s", spec.name, error)
                answer["note"] = f"Optuna could not compute importances: {error}"
        with self._lock:
            self._answers[spec.name] = (complete, answer)
        return answer
