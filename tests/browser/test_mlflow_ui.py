"""The MLflow UI over a real small search, read in headless Chromium as a user reads it.

The session's real search (tests/conftest.py: 4 trials x 2 epochs, local Ray, SQLite stores) fills a fresh MLflow store;
``mlflow server`` serves it on 127.0.0.1 (a free port); Debian's Chromium (/usr/bin/chromium, driven by Playwright
for Python, no browser download; ``scripts/setup-browser.sh`` installs it) opens the pages. Each test saves a
screenshot under ``test-output/browser/`` (git-ignored), printed at the start.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from search import tracking
from search.publish import SearchResult
from search.report import FIGURES
from tests.servers import mlflow_server

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-output" / "browser"
CHROMIUM = os.environ.get("DRCAPS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 120_000          # pages render slowly when 2 cores also run Ray trials and other tests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def searched(searched: tuple[SearchResult, Path]) -> SearchResult:
    """The session's one real search (tests/conftest.py)."""
    return searched[0]


@pytest.fixture(scope="module")
def server(searched: SearchResult, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` over the search's store; its base URL. One worker: enough for one browser, and starts
    reliably on a loaded 2-core machine (4 uvicorn workers time out there)."""
    with mlflow_server(searched.tracking_uri, tmp_path_factory.mktemp("mlflow-server")) as base:
        yield base


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A fresh headless Chromium profile (the system browser), one page, 1400x1000."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup-browser.sh (make test does)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {SCREENSHOTS}")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        try:
            yield context.new_page()
        finally:
            context.close()


def _open(page: Any, url: str, text: str) -> None:
    """Load ``url`` afresh until ``text`` shows; a second full load if the app stalls (seen on a loaded machine),
    with a screenshot of each stalled attempt."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in (1, 2):
        page.goto("about:blank")
        page.goto(url)
        try:
            page.get_by_text(text, exact=True).first.wait_for(timeout=WAIT_MS // 2)
            return
        except PlaywrightTimeout:
            slug = re.sub(r"[^\w-]+", "_", url[-60:])
            page.screenshot(path=str(SCREENSHOTS / f"stalled-{slug}-{attempt}.png"))
    pytest.fail(f"{url}: {text!r} not shown after two loads of {WAIT_MS // 2000} s each (screenshots in "
                f"{SCREENSHOTS})")


def _shot(page: Any, name: str) -> None:
    """The viewport as it is scrolled (MLflow scrolls an inner panel, so a full-page shot adds nothing)."""
    page.wait_for_timeout(500)                        # let charts finish their transition
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def _experiment_id(searched: SearchResult) -> str:
    return tracking.ensure_experiment(searched.tracking_uri, searched.experiment.mlflow_experiment)   # it exists


def _name(run: tracking.RunRecord) -> str:
    return run.tags["mlflow.runName"]


def test_the_search_and_its_trials_are_listed(searched, server, browser):
    page, uri = browser, searched.tracking_uri
    parent = tracking.get_run(uri, searched.parent_run_id)
    trials = tracking.child_runs(uri, searched.parent_run_id)
    assert len(trials) == 4
    _open(page, f"{server}/#/experiments/{_experiment_id(searched)}/runs", _name(parent))
    if not page.get_by_text(_name(trials[0]), exact=True).first.is_visible():   # folded under the parent: unfold
        page.locator(f'[row-id="{parent.run_id}"] button').first.click()
    for trial in trials:
        page.get_by_text(_name(trial), exact=True).first.wait_for(timeout=WAIT_MS)
    _shot(page, "1-experiment-runs")


def test_the_parent_run_shows_its_metrics(searched, server, browser):
    page, uri = browser, searched.tracking_uri
    parent = tracking.get_run(uri, searched.parent_run_id)
    _open(page, f"{server}/#/experiments/{_experiment_id(searched)}/runs/{parent.run_id}", "About this run")
    heading = page.get_by_text(re.compile(r"^Metrics \(\d+\)$")).first
    heading.wait_for(timeout=WAIT_MS)
    heading.scroll_into_view_if_needed()
    _shot(page, "2-parent-run-overview")
    shown = int(re.search(r"\d+", heading.inner_text())[0])
    assert shown >= 1 and shown == len(parent.metrics), f"the parent run shows {heading.inner_text()}"
    assert any(searched.experiment.search.metric in name for name in parent.metrics), sorted(parent.metrics)
    for name in parent.metrics:
        assert page.get_by_text(name, exact=True).count() >= 1, f"metric {name} not on the page"


def test_the_parent_run_holds_the_report(searched, server, browser):
    page = browser
    _open(page, f"{server}/#/experiments/{_experiment_id(searched)}/runs/{searched.parent_run_id}/artifacts",
          "resolved_experiment.json")
    report = page.get_by_text("report", exact=True).first
    try:
        report.wait_for(timeout=10_000)
    finally:
        _shot(page, "3-parent-run-artifacts")
    report.click()
    html = page.get_by_text(re.compile(r"\.html$")).first
    html.wait_for(timeout=WAIT_MS)
    html.click()
    drawn, deadline = 0, time.monotonic() + WAIT_MS / 1000   # the preview shows the page in an iframe
    while drawn < len(FIGURES) and time.monotonic() < deadline:
        page.wait_for_timeout(1000)
        counts = [f.evaluate("document.querySelectorAll('.js-plotly-plot').length") for f in page.frames[1:]]
        drawn = max(counts, default=0)
    _shot(page, "3-parent-run-report")
    assert drawn == len(FIGURES), f"the report preview drew {drawn} of {len(FIGURES)} figures"


def test_the_best_runs_metric_chart_renders(searched, server, browser):
    page, uri, metric = browser, searched.tracking_uri, searched.experiment.search.metric
    best = tracking.get_run(uri, searched.best_run_id)
    _open(page, f"{server}/#/experiments/{_experiment_id(searched)}/runs/{best.run_id}/model-metrics",
          "Model metrics")
    search = page.get_by_placeholder("Search metric charts")   # cards off screen are not drawn: filter them
    search.wait_for(timeout=WAIT_MS)
    search.fill(metric)
    card = page.locator('[data-testid="experiment-view-compare-runs-card"]').filter(
        has=page.get_by_text(metric, exact=True))
    plot = card.locator(".js-plotly-plot").first
    plot.wait_for(timeout=WAIT_MS)
    card.first.scroll_into_view_if_needed()
    _shot(page, "4-best-run-metric-charts")
    drawn = plot.evaluate("gd => gd.data.map(t => Array.from(t.y || []))")
    expected = [value for _, value in tracking.metric_history(uri, best.run_id, metric)]
    assert expected and expected in [[float(v) for v in ys] for ys in drawn], (drawn, expected)
    assert plot.locator("path.js-line, g.scatterlayer path").count() >= 1     # a drawn line, not an empty frame


def test_the_registered_model_shows_best_linked_to_its_run(searched, server, browser):
    page, uri = browser, searched.tracking_uri
    name, _, alias = searched.model_uri.removeprefix("models:/").partition("@")
    version = tracking.model_version(uri, name, alias)
    assert version["run_id"] == searched.best_run_id
    _open(page, f"{server}/#/models/{name}/versions/{version['version']}", f"Version {version['version']}")
    page.get_by_text(re.compile(rf"@\s*{alias}")).first.wait_for(timeout=WAIT_MS)
    _shot(page, "5-model-version")
    assert page.locator(f'a[href$="/runs/{searched.best_run_id}"]').count() >= 1, "no link to the source run"
    # the logged model links back to the registered version, as log_model(registered_model_name=...) does
    assert version["model_id"], version
    _open(page, f"{server}/#/experiments/{_experiment_id(searched)}/models/{version['model_id']}", "Source run ID")
    _shot(page, "5-logged-model")
    assert page.get_by_text("Not registered", exact=True).count() == 0, "the logged model page offers to register"
    assert page.locator(f'a[href*="/models/{name}"]').count() >= 1, "no link to the registered model"
    assert page.get_by_text(re.compile(rf"^v{version['version']}$")).count() >= 1, "no version shown"


def test_a_printed_link_opens_the_model_training_view(searched, server, browser):
    """In a fresh browser MLflow 3.17 shows an experiment in its GenAI view (traces, evaluation runs), where a
    search's runs sit behind the "Model training" toggle; the view is chosen by the URL's ``workflowType`` query
    parameter, else by the browser's localStorage. The links drcaps prints (``tracking.run_url``) carry it: the
    run's page opens with the model-training sidebar, whose Runs entry lists the search."""
    page, uri = browser, searched.tracking_uri
    parent = tracking.get_run(uri, searched.parent_run_id)
    link = tracking.run_url(uri, parent.run_id, ui=server)
    assert link.endswith(f"/runs/{parent.run_id}?workflowType=machine_learning"), link
    _open(page, link.partition("?")[0], "About this run")           # without it: the GenAI view, as reported
    page.get_by_text("Evaluation runs", exact=True).first.wait_for(timeout=WAIT_MS)
    _open(page, link, "About this run")
    page.get_by_text("Model registry", exact=True).first.wait_for(timeout=WAIT_MS)
    _shot(page, "0-printed-link-model-training")
    assert page.get_by_text("Evaluation runs", exact=True).count() == 0, "still the GenAI view"
    page.locator('a[href$="/runs?workflowType=machine_learning"]').first.click()     # the sidebar's Runs
    page.get_by_text(_name(parent), exact=True).first.wait_for(timeout=WAIT_MS)
    _shot(page, "0-printed-link-runs")
