"""Browser tests: Playwright drives Debian's Chromium against a real `clrsearch serve`.

Playwright never downloads a browser here: it is pointed at /usr/bin/chromium, which
`.ci/run` installs with apt. Without it these tests skip locally and fail in CI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.browser.protocol import FakeWorkers, Server
from tests.processes import clrsearch, free_port, stop, wait_healthy

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must provide it: see .ci/run)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        _missing(f"Debian's Chromium is not at {CHROMIUM}; apt-get install chromium")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _missing("the playwright package is not installed; pip install -e '.[dev]'")
    # Generous: the machines these run on are small and shared.
    expect.set_options(timeout=20_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    database_url = f"sqlite:///{folder / 'dashboard.db'}"
    log = folder / "server.log"
    process = clrsearch("serve", "--port", str(port), "--log-level", "WARNING",
                        "--database-url", database_url, log=log)
    http = httpx.Client(base_url=url, timeout=30)
    try:
        wait_healthy(url, process, log)
        yield Server(url, database_url, FakeWorkers(http))
    finally:
        http.close()
        stop(process)


@pytest.fixture
def page(browser):
    """A fresh page; the test fails if the page logs an error or throws."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20_000)
    problems: list[str] = []
    page.on("console", lambda message: problems.append(f"console: {message.text}")
            if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    yield page
    context.close()
    assert not problems, "\n".join(problems)
