"""Take the README's dashboard screenshots from a real search, with Playwright.

    .venv/bin/python docs/screenshots/take.py            # about two minutes on 2 cores

Starts `clrsearch serve` on a scratch SQLite file and two CPU workers training the bundled
digits data, waits until most trials have ended (so some still run), then photographs
the workers page, the study page and the best trial's page with Debian's Chromium
(/usr/bin/chromium; Playwright downloads nothing). Writes the PNGs beside this file.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import expect, sync_playwright

HERE = Path(__file__).resolve().parent
STUDY = "digits-clr"
SPEC = {
    "name": STUDY,
    "space": {"mode": ["triangular", "triangular2"],
              "max_lr": {"low": 0.01, "high": 1.0, "log": True}},
    "task": {"epochs": 10},
    # An LR range test first, so that the study page shows its curve and bounds.
    "lr_bounds": "auto",
    "n_trials": 40,
    "parallelism": 2,
    "sampler_seed": 0,
}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        log = (folder / "processes.log").open("wb")
        processes = [start(log, "serve", "--port", str(port), "--log-level", "WARNING",
                           "--database-url", f"sqlite:///{folder / 'shots.db'}")]
        try:
            wait_healthy(url)
            httpx.post(f"{url}/api/v1/studies", json=SPEC).raise_for_status()
            for index in range(2):
                processes.append(start(
                    log, "worker", "--server", url, "--worker-id", f"cpu-{index}",
                    "--device", "cpu", "--threads", "1", "--data-dir", str(folder / "data"),
                    "--log-level", "WARNING"))
            wait_until_ended(url, SPEC["n_trials"] - 8)
            photograph(url)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=30)


def start(log, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "clrsearch", *args], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ})


def wait_healthy(url: str) -> None:
    for _ in range(300):
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start")


def wait_until_ended(url: str, ended: int) -> None:
    while True:
        counts = httpx.get(f"{url}/api/v1/studies/{STUDY}").json()["counts"]
        done = counts["complete"] + counts["pruned"] + counts["failed"] + counts["stopped"]
        if done >= ended:
            return
        time.sleep(2)


def photograph(url: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 360},
                                device_scale_factor=1)
        # First, while both workers still hold trials.
        page.goto(f"{url}/dashboard/workers")
        expect(page.locator("#workers tbody tr")).to_have_count(2)
        page.screenshot(path=HERE / "workers.png")

        page.set_viewport_size({"width": 1400, "height": 900})
        page.goto(f"{url}/dashboard/studies/{STUDY}?page_size=12")
        expect(page.locator("#chart-importances .row").first).to_be_visible(timeout=60_000)
        expect(page.locator("#chart-parallel")).to_have_attribute("data-lines", re.compile(r"\d+"))
        expect(page.locator("#chart-range-test")).to_have_attribute(
            "data-markers", "base_lr,max_lr,loss_minimum_lr")
        page.wait_for_timeout(500)
        page.screenshot(path=HERE / "study.png", full_page=True)

        best = httpx.get(f"{url}/api/v1/studies/{STUDY}/best").json()["number"]
        page.goto(f"{url}/dashboard/studies/{STUDY}/trials/{best}")
        expect(page.locator("#chart-trace")).to_have_attribute("data-series", "2")
        page.wait_for_timeout(500)
        page.screenshot(path=HERE / "trial.png", full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
