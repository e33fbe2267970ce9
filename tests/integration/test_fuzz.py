"""Schemathesis against the OpenAPI document of a real server: no request gets a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.processes import clrsearch, free_port, stop, wait_healthy

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 60
REQUIRED_REQUESTS = 1000


@pytest.fixture(scope="module")
def server_url(tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = folder / "server.log"
    server = clrsearch("serve", "--port", str(port), "--log-level", "WARNING",
                       "--database-url", f"sqlite:///{folder / 'fuzz.db'}", log=log)
    try:
        wait_healthy(url, server, log)
        yield url
    finally:
        stop(server)


@pytest.fixture(scope="module")
def api_schema(server_url: str):
    return schemathesis.openapi.from_url(f"{server_url}/openapi.json")


def test_no_generated_request_gets_a_server_error(api_schema) -> None:
    """At least 1,000 requests spread over every operation; any 5xx fails the test."""
    sent: list[int] = []
    server_errors: list[str] = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case) -> None:
            response = case.call(timeout=30)
            sent.append(response.status_code)
            if response.status_code >= 500:
                server_errors.append(f"{case.method} {case.formatted_path} -> "
                                     f"{response.status_code}: {response.text[:300]}")

        call()

    assert not server_errors, "\n".join(server_errors[:10])
    assert len(sent) >= REQUIRED_REQUESTS, len(sent)
