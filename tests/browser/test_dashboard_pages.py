"""Every dashboard page in Chromium against a real server, with trials in every state.

The study "mixed" has three complete trials, one pruned, one failed and two running (one
with two epochs reported, one with none), all driven through the worker protocol. Tests
that change data make studies of their own, so the counts asserted here stay put.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from tests.browser.protocol import STEPS_PER_EPOCH, Server, add_baseline_run

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MIXED = "mixed"
EPOCHS = 4
# Cycle-aware pruning is off so that the median pruner sees every epoch: trial 3's
# terrible first epoch is then pruned at once.
PRUNER = {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0, "cycle_aware": False}
SPACE = {"mode": ["triangular", "triangular2"]}
# The third is best: a worse third would already be pruned by the first two.
FINAL_VALUES = (0.30, 0.40, 0.25)
FAST = "?poll_ms=250"


def curve(final: float, epoch: int) -> float:
    """A validation loss falling to `final` at the last epoch."""
    return final + 0.2 * (EPOCHS - epoch)


@pytest.fixture(scope="module")
def mixed(server: Server) -> list[dict[str, Any]]:
    workers = server.workers
    workers.submit(MIXED, n_trials=7, parallelism=7, pruner=PRUNER, space=SPACE,
                   task={"epochs": EPOCHS}, sampler="random", sampler_seed=3)
    trials = [workers.claim(f"worker-{i}", MIXED, "cuda:0" if i % 2 else "cpu") for i in range(7)]
    for trial, final in zip(trials[:3], FINAL_VALUES, strict=True):
        for epoch in range(1, EPOCHS + 1):
            assert workers.report(trial, epoch, curve(final, epoch)) == "continue"
        assert workers.complete(trial, final) == "complete"
    assert workers.report(trials[3], 1, 5.0) == "prune"
    workers.report(trials[4], 1, 0.6)
    workers.report(trials[4], 2, 0.55)
    assert workers.fail(trials[4], "RuntimeError: CUDA out of memory") == "failed"
    workers.report(trials[5], 1, 0.5)
    workers.report(trials[5], 2, 0.45)
    return trials


def open_study(page: Page, server: Server, name: str, query: str = "") -> None:
    page.goto(f"{server.url}/dashboard/studies/{name}{query}")


def test_studies_page_shows_progress_running_trials_and_best_value(
    page: Page, server: Server, mixed: list[dict[str, Any]]
) -> None:
    page.goto(f"{server.url}/dashboard")

    row = page.locator(f'tr[data-study="{MIXED}"]')
    expect(row.locator(".progress-cell")).to_have_text("5 / 7")
    expect(row.locator(".running-count")).to_have_text("2")
    expect(row).to_contain_text("0.25")
    expect(row).to_contain_text("random")
    expect(row).to_contain_text("median")


def test_study_page_charts_hold_one_series_per_trial_and_every_point(
    page: Page, server: Server, mixed: list[dict[str, Any]]
) -> None:
    open_study(page, server, MIXED)

    expect(page.locator("#progress-text")).to_have_text("5 / 7 done, 2 running now")
    # History: each complete trial's value, and the best so far at each.
    expect(page.locator("#chart-history")).to_have_attribute("data-series", "2")
    expect(page.locator("#chart-history")).to_have_attribute("data-points", "6")
    # Curves: every trial that reported an epoch: 3 x 4 complete, 1 pruned, 2 failed,
    # 2 running.
    expect(page.locator("#chart-curves")).to_have_attribute("data-series", "6")
    expect(page.locator("#chart-curves")).to_have_attribute("data-points", "17")
    # LR schedules of the 3 complete trials, each at all of its 4 x 20 steps.
    expect(page.locator("#chart-schedules")).to_have_attribute("data-series", "3")
    expect(page.locator("#chart-schedules")).to_have_attribute(
        "data-points", str(3 * EPOCHS * STEPS_PER_EPOCH))
    # Parallel coordinates: base_lr, max_lr, step_size_up, mode, then the objective.
    expect(page.locator("#chart-parallel")).to_have_attribute("data-lines", "3")
    expect(page.locator("#chart-parallel")).to_have_attribute("data-axes", "5")
    expect(page.locator("#chart-importances")).to_have_attribute("data-bars", "4")
    expect(page.locator("#comparison-box")).to_be_hidden()
    expect(page.locator("#best-link")).to_have_text(f"#{mixed[2]['number']}")


def test_pruned_curves_are_faint_and_the_best_is_drawn_last_and_thickest(
    page: Page, server: Server, mixed: list[dict[str, Any]]
) -> None:
    open_study(page, server, MIXED)
    expect(page.locator("#chart-curves")).to_have_attribute("data-series", "6")

    series = page.evaluate("""() => {
        const plot = clr.charts.curves.plot;
        return plot.series.slice(1).map((s, i) => ({label: s.label, width: s.width,
            stroke: typeof s.stroke === "function" ? s.stroke(plot, i + 1) : s.stroke}));
    }""")

    best = series[-1]
    pruned = [s for s in series if "pruned" in s["label"]]
    assert f"trial {mixed[2]['number']}" in best["label"] and "best" in best["label"]
    assert best["width"] == max(s["width"] for s in series)
    assert len(pruned) == 1 and "0.22" in pruned[0]["stroke"]


def test_trial_table_pages_and_sorts_on_the_server(
    page: Page, server: Server, mixed: list[dict[str, Any]]
) -> None:
    open_study(page, server, MIXED, "?page_size=3")
    rows = page.locator("#trials tbody tr")
    numbers = [trial["number"] for trial in mixed]

    expect(page.locator("#page-text")).to_have_text("1–3 of 7")
    expect(rows.first).to_have_attribute("data-number", str(max(numbers)))
    page.click("#page-next")
    expect(page.locator("#page-text")).to_have_text("4–6 of 7")
    page.click("#page-next")
    expect(page.locator("#page-text")).to_have_text("7–7 of 7")
    expect(page.locator("#page-next")).to_be_disabled()

    page.click('th[data-sort="value"]')
    expect(page.locator("#page-text")).to_have_text("1–3 of 7")
    wait_for_rows(page, [mixed[2], mixed[0], mixed[1]])

    page.click('th[data-sort="value"]')
    wait_for_rows(page, [mixed[3], mixed[1], mixed[0]])

    page.click('th[data-sort="params.max_lr"]')
    expect(page.locator('th[data-sort="params.max_lr"]')).to_have_class("sortable sorted")
    wait_for_rows(page, sorted(mixed, key=lambda trial: trial["params"]["max_lr"])[:3])


def test_trial_table_filters_by_state(
    page: Page, server: Server, mixed: list[dict[str, Any]]
) -> None:
    open_study(page, server, MIXED)

    page.select_option("#state-filter", "running")
    expect(page.locator("#page-text")).to_have_text("1–2 of 2")
    page.select_option("#state-filter", "pruned")
    expect(page.locator("#page-text")).to_have_text("1–1 of 1")
    expect(page.locator("#trials tbody tr").first).to_have_attribute("data-state", "pruned")


def test_trial_page_shows_lr_and_momentum_of_every_step_and_the_epoch_curves(
    page: Page, server: Server, mixed: list[dict[str, Any]]
) -> None:
    page.goto(f"{server.url}/dashboard/studies/{MIXED}/trials/{mixed[0]['number']}")

    steps = EPOCHS * STEPS_PER_EPOCH
    expect(page.locator("#chart-trace")).to_have_attribute("data-series", "2")
    expect(page.locator("#chart-trace")).to_have_attribute("data-points", str(2 * steps))
    expect(page.locator("#chart-loss")).to_have_attribute("data-points", str(2 * EPOCHS))
    expect(page.locator("#chart-accuracy")).to_have_attribute("data-points", str(EPOCHS))
    expect(page.locator("#epochs tbody tr")).to_have_count(EPOCHS)
    expect(page.locator("#trial-state")).to_have_text("complete")
    expect(page.locator("#params")).to_contain_text("max_lr")
    expect(page.locator("#trace-note")).to_have_text(f"{steps} steps")
    expect(page.locator("#error")).to_be_hidden()


def test_failed_trial_page_shows_the_error_the_worker_sent(
    page: Page, server: Server, mixed: list[dict[str, Any]]
) -> None:
    page.goto(f"{server.url}/dashboard/studies/{MIXED}/trials/{mixed[4]['number']}")

    expect(page.locator("#trial-state")).to_have_text("failed")
    expect(page.locator("#error")).to_have_text("RuntimeError: CUDA out of memory")
    expect(page.locator("#facts")).to_contain_text("worker-4")


def test_workers_page_shows_each_worker_its_trial_and_lease_health(
    page: Page, server: Server, mixed: list[dict[str, Any]]
) -> None:
    for trial in mixed[5:]:
        server.workers.heartbeat(trial)
    page.goto(f"{server.url}/dashboard/workers")

    expect(page.locator("#workers tbody tr")).to_have_count(7)
    holder = page.locator('tr[data-worker="worker-5"]')
    expect(holder).to_have_attribute("data-health", "healthy")
    expect(holder).to_contain_text(f"{MIXED} · trial {mixed[5]['number']}")
    expect(holder).to_contain_text("cuda:0")
    expect(page.locator('tr[data-worker="worker-0"]')).to_have_attribute("data-health", "idle")


def test_study_page_follows_a_running_trial_without_reloading(
    page: Page, server: Server, mixed: list[dict[str, Any]]
) -> None:
    workers = server.workers
    workers.submit("live", n_trials=1, parallelism=1, pruner="none", task={"epochs": 3})
    trial = workers.claim("live-worker", "live")
    open_study(page, server, "live", FAST)
    expect(page.locator("#chart-curves .empty")).to_be_visible()
    page.evaluate("window.sameDocument = true")

    workers.report(trial, 1, 0.9)
    expect(page.locator("#chart-curves")).to_have_attribute("data-points", "1")
    workers.report(trial, 2, 0.7)
    expect(page.locator("#chart-curves")).to_have_attribute("data-points", "2")
    expect(page.locator("#trials tbody tr").first.locator("td").nth(1)).to_have_text("running")
    workers.complete(trial, 0.7)

    expect(page.locator("#study-state")).to_have_text("complete")
    expect(page.locator("#chart-history")).to_have_attribute("data-points", "2")
    expect(page.locator("#trials tbody tr").first).to_have_attribute("data-state", "complete")
    assert page.evaluate("window.sameDocument") is True


def test_trial_page_follows_its_trial_until_it_ends(
    page: Page, server: Server, mixed: list[dict[str, Any]]
) -> None:
    workers = server.workers
    workers.submit("followed", n_trials=1, parallelism=1, pruner="none", task={"epochs": 2})
    trial = workers.claim("follow-worker", "followed")
    page.goto(f"{server.url}/dashboard/studies/followed/trials/{trial['number']}{FAST}")
    expect(page.locator("#trial-state")).to_have_text("running")

    workers.report(trial, 1, 0.8)
    expect(page.locator("#chart-trace")).to_have_attribute("data-points",
                                                         str(2 * STEPS_PER_EPOCH))
    workers.report(trial, 2, 0.6)
    workers.complete(trial, 0.6)

    expect(page.locator("#trial-state")).to_have_text("complete")
    expect(page.locator("#chart-loss")).to_have_attribute("data-points", "4")
    expect(page.locator("#live-status")).to_have_text("final")


def test_stop_button_stops_a_study_after_a_second_click(
    page: Page, server: Server, mixed: list[dict[str, Any]]
) -> None:
    server.workers.submit("stoppable", n_trials=3)
    page.goto(f"{server.url}/dashboard{FAST}")
    row = page.locator('tr[data-study="stoppable"]')

    row.locator("button").click()
    expect(row.locator("button")).to_have_text("click again to stop")
    row.locator("button").click()

    expect(row.locator(".badge")).to_have_text("stopped")
    expect(page.locator("#message")).to_contain_text("stopped")
    assert server.workers.http.get("/api/v1/studies/stoppable").json()["state"] == "stopped"


def test_baseline_chart_appears_once_the_study_has_a_baseline_run(
    page: Page, server: Server, mixed: list[dict[str, Any]]
) -> None:
    workers = server.workers
    workers.submit("compared", n_trials=1, parallelism=1, pruner="none", task={"epochs": 3})
    trial = workers.claim("compare-worker", "compared")
    for epoch, loss in enumerate((0.9, 0.6, 0.4), start=1):
        workers.report(trial, epoch, loss)
    workers.complete(trial, 0.4)
    open_study(page, server, "compared", FAST)
    expect(page.locator("#chart-curves")).to_have_attribute("data-series", "1")
    expect(page.locator("#comparison-box")).to_be_hidden()

    insert_baseline(server.database_url, "compared", losses=(1.0, 0.8, 0.7))

    expect(page.locator("#comparison-box")).to_be_visible()
    expect(page.locator("#chart-comparison")).to_have_attribute("data-series", "2")
    expect(page.locator("#chart-comparison")).to_have_attribute("data-points", "6")
    expect(page.locator("#comparison-box")).to_contain_text("best baseline")
    # Smith's figure: 0.7 reached at epoch 2 (40 iterations) of the baseline's 60.
    expect(page.locator("#comparison-note")).to_contain_text(
        "reached the baseline's final val_loss (0.7) after 40 iterations: 0.67 of the "
        "baseline's 60 iterations")
    # The baseline is no CyclicLR trial: it stays out of the search's own charts.
    expect(page.locator("#chart-curves")).to_have_attribute("data-series", "1")
    expect(page.locator("#trials tbody .badge.baseline")).to_have_count(1)


def insert_baseline(database_url: str, study_name: str, losses: tuple[float, ...]) -> None:
    engine = create_engine(database_url)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with Session(engine) as session, session.begin():
        add_baseline_run(session, study_name, losses, now)
    engine.dispose()


def wait_for_rows(page: Page, trials: list[dict[str, Any]]) -> None:
    """Wait until the table shows exactly these trials, in this order."""
    expected = ",".join(str(trial["number"]) for trial in trials)
    page.wait_for_function(
        """(expected) => [...document.querySelectorAll("#trials tbody tr")]
            .map((row) => row.dataset.number).join(",") === expected""",
        arg=expected,
    )
