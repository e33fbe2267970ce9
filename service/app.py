"""The FastAPI application: wiring, error mapping, the lease sweeper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import clrsearch
from service import api, dashboard, domain
from service.db import db_now, make_engine, make_sessionmaker, unit_of_work
from service.errors import ClrsearchError
from service.migrations import upgrade_database
from service.optuna_bridge import OptunaBridge
from service.proposer import AskAhead
from service.settings import ServerSettings

logger = logging.getLogger(__name__)


def create_app(settings: ServerSettings | None = None, migrate: bool = True) -> FastAPI:
    """Build the server. Migrations run at start-up unless `migrate` is False."""
    settings = settings or ServerSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            await asyncio.to_thread(upgrade_database, settings.database_url)
        engine = make_engine(settings.database_url)
        app.state.sessions = make_sessionmaker(engine)
        app.state.bridge = OptunaBridge(
            engine, AskAhead(settings.database_url) if settings.ask_ahead else None)
        stopping = asyncio.Event()
        sweeper = asyncio.create_task(
            _sweep_forever(app, settings.sweep_interval_s, stopping))
        logger.info("server ready on %s:%d", settings.host, settings.port)
        try:
            yield
        finally:
            # Not cancelled: a sweep already running in its thread would go on using a
            # connection after the engine is disposed below.
            stopping.set()
            await sweeper
            app.state.bridge.close()
            engine.dispose()

    app = FastAPI(
        title="clrsearch",
        version=clrsearch.__version__,
        description="Hyperparameter search for torch's CyclicLR schedules.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_middleware(_BodySizeLimit, max_bytes=settings.max_body_bytes)
    # The worker protocol first: routes are matched in order, and its calls are the
    # most frequent by far.
    app.include_router(api.workers)
    app.include_router(api.studies)
    dashboard.install(app)
    _install_error_handlers(app)

    @app.get("/healthz", tags=["health"])
    def healthz(request: Request) -> dict[str, str]:
        """Liveness and database reachability."""
        with unit_of_work(request.app.state.sessions) as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok"}

    return app


def app_from_environment() -> FastAPI:
    """Factory for `uvicorn --factory` and multi-process serving: settings from the env."""
    return create_app(ServerSettings())


async def _sweep_forever(app: FastAPI, interval_s: float, stopping: asyncio.Event) -> None:
    """Return lapsed leases to the queue even when no worker is claiming."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=interval_s)
            return
        try:
            await asyncio.to_thread(_sweep_once, app)
        except Exception:
            logger.exception("lease sweep failed; trying again in %.0f s", interval_s)


def _sweep_once(app: FastAPI) -> None:
    with unit_of_work(app.state.sessions) as session:
        app.state.bridge.lock_journal(session)  # before the clock's query, as every writer
        domain.sweep_lapsed_leases(session, app.state.bridge, db_now(session))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClrsearchError)
    async def _domain_error(_request: Request, error: ClrsearchError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        # One readable line per problem, each naming the field: "space.max_lr: ...".
        problems = []
        for item in error.errors():
            # A rule across several fields of the spec has no narrower place than "body";
            # its message names the fields.
            location = ".".join(str(part) for part in item["loc"] if part != "body") or "body"
            message = item["msg"].removeprefix("Value error, ")
            problems.append({"field": location, "message": message})
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return JSONResponse(
            {"detail": summary, "errors": jsonable_encoder(problems)}, status_code=422
        )


class _BodyTooLarge(HTTPException):
    """Raised while a body is read; an HTTPException so that FastAPI's body parsing lets
    it through (it answers any other error there with a 400) and answers it as a 413."""


class _BodySizeLimit:
    """Refuse bodies larger than the configured limit: at once when Content-Length says
    so, and as soon as a body sent without it (chunked) passes the limit.

    A plain ASGI middleware rather than Starlette's `BaseHTTPMiddleware`, which runs
    every request through a task group and memory streams: about 0.3 ms a request here.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, f"request body of {length} bytes")
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(413, self._too_large("a request body"))
            return message

        async def noting_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, noting_send)
        except _BodyTooLarge:
            # Only a route that reads its body outside FastAPI's parsing gets here.
            if started:
                raise
            await self._refuse(scope, receive, send, "a request body")

    def _too_large(self, what: str) -> str:
        return f"{what} is over the {self.max_bytes}-byte limit (CLRSEARCH_MAX_BODY_BYTES)"

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        response = JSONResponse({"detail": self._too_large(what)}, status_code=413)
        await response(scope, receive, send)
