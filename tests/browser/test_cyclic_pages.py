"""What the dashboard draws about cyclic schedules, in Chromium against a real server: the
LR range test on the study page, the predicted schedule of a trial not yet run, and the
schedule preview page.

Every study here leaves nothing for a later claim to pick up (a range test on its own, or
a budget and parallelism of one, claimed), so each test's claims go to its own study.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.browser.protocol import STEPS_PER_EPOCH, Server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

FAST = "?poll_ms=250"
CURVE_POINTS = 101
MARKERS = ("base_lr", "max_lr", "loss_minimum_lr")
REFUSED = "the server responded with a status of 422"


@pytest.fixture
def refusing_page(browser) -> Iterator[Page]:
    """Like conftest's `page`, for tests that provoke a 422 on purpose: Chromium logs every
    refused request as a console error, and only those are let through."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20_000)
    problems: list[str] = []
    page.on("console", lambda message: problems.append(f"console: {message.text}")
            if message.type == "error" and REFUSED not in message.text else None)
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    yield page
    context.close()
    assert not problems, "\n".join(problems)


def range_curve() -> dict[str, Any]:
    """A smoothed loss that falls between 1e-3 and 0.1 and explodes past 1, as Smith draws."""
    lrs = [1e-5 * 10 ** (6 * i / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)]
    losses = [2.0 / (1 + (lr / 0.03) ** 2) + 0.1 + (lr > 1.0) * 5 * lr for lr in lrs]
    return {"lrs": lrs, "losses": losses, "diverged": True}


def end_range_test(server: Server, trial: dict[str, Any], curve: dict[str, Any]) -> None:
    response = server.workers.http.post(
        f"/api/v1/worker/trials/{trial['trial_id']}/complete",
        json={"lease_id": trial["lease_id"], "value": 0.0, "range_test": curve})
    assert response.status_code == 200, response.text


def test_study_page_draws_the_range_test_curve_with_the_bounds_marked(
    page: Page, server: Server
) -> None:
    workers = server.workers
    workers.submit("ranged", lr_bounds="auto", n_trials=0)
    trial = workers.claim("range-worker", "ranged")
    page.goto(f"{server.url}/dashboard/studies/ranged{FAST}")
    box = page.locator("#chart-range-test")
    expect(page.locator("#range-test-state")).to_have_text("running")
    expect(box.locator(".empty")).to_be_visible()

    end_range_test(server, trial, range_curve())

    expect(page.locator("#range-test-state")).to_have_text("complete")
    expect(box).to_have_attribute("data-curve-points", str(CURVE_POINTS))
    expect(box).to_have_attribute("data-markers", ",".join(MARKERS))
    # The curve, then one marked point per reading, each at the LR the server read.
    expect(box).to_have_attribute("data-series", str(1 + len(MARKERS)))
    expect(box).to_have_attribute("data-points", str(CURVE_POINTS + len(MARKERS)))
    view = workers.http.get("/api/v1/studies/ranged/range-test").json()
    marked = page.evaluate("""() => {
        const plot = clr.charts.rangeTest.plot;
        return plot.data.slice(2).map((ys) => plot.data[0][ys.findIndex((y) => y !== null)]);
    }""")
    assert marked == [view[key] for key in MARKERS]
    assert view["base_lr"] < view["max_lr"] < view["loss_minimum_lr"]
    assert page.evaluate("clr.charts.rangeTest.plot.scales.x.distr") == 3  # log LR axis
    expect(page.locator("#chart-range-test .u-legend")).to_contain_text("suggested max_lr")
    expect(page.locator("#range-test-error")).to_be_hidden()


def test_a_failed_range_test_shows_its_error_beside_its_curve(page: Page, server: Server) -> None:
    workers = server.workers
    workers.submit("flat", lr_bounds="auto", n_trials=0)
    trial = workers.claim("flat-worker", "flat")
    end_range_test(server, trial, {"lrs": [1e-5, 1e-3, 1e-1], "losses": [1.0, 1.0, 1.0]})

    page.goto(f"{server.url}/dashboard/studies/flat")

    expect(page.locator("#range-test-state")).to_have_text("failed")
    expect(page.locator("#range-test-error")).to_contain_text("loss never fell")
    expect(page.locator("#chart-range-test")).to_have_attribute("data-points", "3")
    expect(page.locator("#chart-range-test")).to_have_attribute("data-markers", "")


def test_trial_page_predicts_the_schedule_until_the_first_epoch_is_reported(
    page: Page, server: Server
) -> None:
    workers = server.workers
    study = workers.submit("predicted", n_trials=1, parallelism=1, pruner="none",
                           task={"epochs": 3})
    trial = workers.claim("predict-worker", "predicted")
    expected = workers.http.post("/api/v1/schedule/preview", json={
        "params": trial["params"], "task": study["spec"]["task"]}).json()
    page.goto(f"{server.url}/dashboard/studies/predicted/trials/{trial['number']}{FAST}")
    box = page.locator("#chart-trace")

    expect(box).to_have_attribute("data-predicted", "yes")
    expect(box).to_have_attribute(
        "data-points", str(len(expected["lr"]) + len(expected["momentum"])))
    expect(page.locator("#trace-predicted")).to_have_text("predicted (not yet run)")
    expect(box.locator(".u-legend")).to_contain_text("learning rate, predicted (not yet run)")
    expect(page.locator("#trace-note")).to_contain_text(f"{expected['total_steps']} steps")

    workers.report(trial, 1, 0.8)

    expect(box).to_have_attribute("data-predicted", "no")
    expect(box).to_have_attribute("data-points", str(2 * STEPS_PER_EPOCH))
    expect(page.locator("#trace-predicted")).to_be_hidden()


def test_trial_page_says_why_imagefolder_trials_have_no_prediction(
    refusing_page: Page, server: Server
) -> None:
    workers = server.workers
    workers.submit("folders", n_trials=1, parallelism=1,
                   task={"dataset": "imagefolder", "data_path": "/data/images"})
    trial = workers.claim("folder-worker", "folders")

    refusing_page.goto(f"{server.url}/dashboard/studies/folders/trials/{trial['number']}")

    empty = refusing_page.locator("#chart-trace .empty")
    expect(empty).to_contain_text("give batches_per_epoch")
    expect(refusing_page.locator("#chart-trace")).to_have_attribute("data-points", "0")


def fill_preview(page: Page, **fields: str) -> None:
    for name, value in fields.items():
        field = page.locator(f'#preview-form [name="{name}"]')
        if field.evaluate("(node) => node.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)
    page.click("#preview-button")


def test_preview_page_draws_lr_and_momentum_for_good_settings(page: Page, server: Server) -> None:
    expected = server.workers.http.post("/api/v1/schedule/preview", json={
        "params": {"base_lr": 0.001, "max_lr": 0.006, "step_size_up": 30,
                   "step_size_unit": "iterations", "mode": "triangular2", "gamma": 1.0,
                   "cycle_momentum": True, "base_momentum": 0.85, "max_momentum": 0.95},
        "task": {"dataset": "digits", "epochs": 2, "batch_size": 32,
                 "optimizer": {"name": "sgd"}}}).json()
    page.goto(f"{server.url}/dashboard")
    page.click("text=Schedule preview")
    # The page writes the settings it draws into its address, so that it can be shared.
    expect(page).to_have_url(re.compile(r"/dashboard/preview\?.*max_lr=0\.1&"))

    fill_preview(page, base_lr="0.001", max_lr="0.006", step_size_up="30",
                 step_size_unit="iterations", mode="triangular2", epochs="2")

    box = page.locator("#chart-preview")
    expect(box).to_have_attribute(
        "data-points", str(len(expected["lr"]) + len(expected["momentum"])))
    expect(box).to_have_attribute("data-series", "2")
    expect(page.locator("#preview-facts")).to_contain_text(str(expected["total_steps"]))
    expect(page.locator("#preview-error")).to_be_hidden()
    assert page.evaluate("clr.charts.preview.plot.data[1]") == expected["lr"]


def test_preview_page_shows_the_refusal_when_max_lr_is_not_above_base_lr(
    refusing_page: Page, server: Server
) -> None:
    refusing_page.goto(f"{server.url}/dashboard/preview")
    expect(refusing_page.locator("#chart-preview")).to_have_attribute("data-series", "2")

    fill_preview(refusing_page, base_lr="0.05", max_lr="0.05")

    expect(refusing_page.locator("#preview-error")).to_contain_text(
        "max_lr must be above base_lr")
    expect(refusing_page.locator("#chart-preview")).to_have_attribute("data-points", "0")


def test_preview_page_draws_a_pasted_spec_at_the_centre_of_its_space(
    page: Page, server: Server
) -> None:
    page.goto(f"{server.url}/dashboard/preview")
    page.click("#spec-preview summary")
    page.fill("#spec-text", '{"space": {"mode": ["exp_range", "triangular"]}, '
                            '"task": {"epochs": 2}}')
    page.click("#spec-button")

    # digits: 45 batches per epoch, so 90 steps, each with an LR and a momentum.
    expect(page.locator("#chart-spec")).to_have_attribute("data-points", str(2 * 90))
    expect(page.locator("#spec-params")).to_contain_text("exp_range")
    expect(page.locator("#spec-error")).to_be_hidden()
