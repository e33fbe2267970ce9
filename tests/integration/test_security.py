"""Tokens on every route, exposure refusal, and tokens kept out of the logs."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from clrsearch.cli import app as cli
from service.app import create_app
from service.settings import ServerSettings

ADMIN, WORKER, READ = "admin-secret-1", "worker-secret-2", "read-secret-3"
OPEN_PATHS = {"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


@pytest.fixture
def guarded(sqlite_url: str) -> Iterator[TestClient]:
    settings = ServerSettings(database_url=sqlite_url, admin_token=ADMIN, worker_token=WORKER,
                              read_token=READ)
    with TestClient(create_app(settings)) as client:
        yield client


def routes(client: TestClient) -> list[tuple[str, str]]:
    """Every operation of the OpenAPI document, with path parameters filled in."""
    paths = client.get("/openapi.json").json()["paths"]
    return [
        (method.upper(), re.sub(r"\{[^}]+\}", "1", path))
        for path, operations in paths.items() if path not in OPEN_PATHS
        for method in operations
    ]


def call(client: TestClient, method: str, path: str, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.request(method, path, headers=headers, json={})


def test_every_route_refuses_a_request_without_a_token(guarded: TestClient) -> None:
    found = routes(guarded)
    assert len(found) >= 13

    for method, path in found:
        assert call(guarded, method, path, None).status_code == 401, (method, path)


def test_every_route_refuses_a_wrong_token(guarded: TestClient) -> None:
    for method, path in routes(guarded):
        assert call(guarded, method, path, "guess").status_code == 403, (method, path)


def test_worker_and_read_tokens_are_refused_on_admin_routes(guarded: TestClient) -> None:
    for token in (WORKER, READ):
        assert call(guarded, "POST", "/api/v1/studies", token).status_code == 403
        assert call(guarded, "POST", "/api/v1/studies/x/stop", token).status_code == 403


def test_read_token_cannot_use_the_worker_protocol(guarded: TestClient) -> None:
    response = call(guarded, "POST", "/api/v1/worker/claim", READ)

    assert response.status_code == 403


def test_each_token_opens_its_own_routes(guarded: TestClient) -> None:
    created = guarded.post("/api/v1/studies", json={"name": "s"},
                           headers={"Authorization": f"Bearer {ADMIN}"})
    claimed = guarded.post("/api/v1/worker/claim", json={"worker_id": "w"},
                           headers={"Authorization": f"Bearer {WORKER}"})
    read = guarded.get("/api/v1/studies", headers={"Authorization": f"Bearer {READ}"})

    assert (created.status_code, claimed.status_code, read.status_code) == (201, 200, 200)


def test_tokens_never_reach_the_logs(guarded: TestClient, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    guarded.post("/api/v1/studies", json={"name": "s"},
                 headers={"Authorization": f"Bearer {ADMIN}"})
    guarded.post("/api/v1/worker/claim", json={"worker_id": "w"},
                 headers={"Authorization": f"Bearer {WORKER}"})
    guarded.get("/api/v1/studies", headers={"Authorization": "Bearer wrong-token-x"})

    for secret in (ADMIN, WORKER, READ, "wrong-token-x"):
        assert secret not in caplog.text


def test_cors_is_closed_by_default(guarded: TestClient) -> None:
    response = guarded.options("/api/v1/studies", headers={
        "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})

    assert "access-control-allow-origin" not in response.headers


def test_oversized_body_is_refused_with_413(sqlite_url: str) -> None:
    with TestClient(create_app(ServerSettings(database_url=sqlite_url,
                                              max_body_bytes=1000))) as client:
        response = client.post("/api/v1/studies", json={"name": "s", "pad": "x" * 2000})

    assert response.status_code == 413
    assert "CLRSEARCH_MAX_BODY_BYTES" in response.json()["detail"]


def test_oversized_body_without_content_length_is_refused_with_413(sqlite_url: str) -> None:
    # A generator makes httpx send the body chunked, with no Content-Length to check.
    chunks = (b'{"name": "s", "pad": "' + b"x" * 600, b"x" * 600 + b'"}')
    with TestClient(create_app(ServerSettings(database_url=sqlite_url,
                                              max_body_bytes=1000))) as client:
        response = client.post("/api/v1/studies", content=iter(chunks),
                               headers={"content-type": "application/json"})

    assert response.status_code == 413
    assert "CLRSEARCH_MAX_BODY_BYTES" in response.json()["detail"]


def test_serve_refuses_a_public_address_without_tokens() -> None:
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"])

    assert result.exit_code == 2
    assert "CLRSEARCH_ADMIN_TOKEN" in result.output
    assert "--insecure" in result.output


def test_public_address_is_allowed_with_tokens_or_insecure() -> None:
    ServerSettings(host="0.0.0.0", admin_token="a", worker_token="w").check_exposure()
    ServerSettings(host="0.0.0.0", insecure=True).check_exposure()
    ServerSettings(host="::1").check_exposure()
