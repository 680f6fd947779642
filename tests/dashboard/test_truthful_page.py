"""The run page in Debian's chromium tells the truth about privacy and curves: a DP run shows
its ε plan from the first second (before any round), this run's ε apart from the site's
lifetime budget, and a legend names only curves that have data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedbus.dashboard.server import BackgroundServer, ServeOptions
from tests.dashboard.test_run_privacy import EXAMPLE, _running



@pytest.fixture(scope="module")
def page(browser):
    pg = browser.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg, errors


def _serve(state: Path) -> BackgroundServer:
    return BackgroundServer(ServeOptions(state=state, port=0)).start()


def test_a_dp_run_shows_its_plan_before_round_1(page, tmp_path: Path) -> None:
    pg, errors = page
    state, run_id = _running(tmp_path, json.loads(EXAMPLE.read_text()))
    server = _serve(state)
    try:
        pg.goto(f"{server.base}/runs/{run_id}")
        kpi = pg.locator(".kpi", has_text="Privacy ε this run")
        kpi.wait_for(timeout=60_000)
        text = kpi.inner_text()
        assert "no DP" not in text and "planned 8.00" in text and "run budget ≤ 8.00" in text, text
        assert "site lifetime ε 17.50 of budget 40.00" in text, text  # the ledger, apart from this run
        planned = pg.locator('#site-privacy tr[data-site="h1"] td.planned-epsilon').get_attribute("data-epsilon")
        assert planned and 0 < float(planned) <= 8.0 + 1e-9
        lifetime = pg.locator('#site-privacy tr[data-site="h1"] td.site-budget').inner_text()
        assert "of 40.00" in lifetime
        assert not errors, errors
    finally:
        server.stop()


def test_legends_name_only_curves_with_data(page, state: Path, run_ids: list[str]) -> None:
    """Run A of the conftest state has no test per round (``test_every`` 0): its curves have no
    test points, so no legend names a test curve; run B scores the test split every round."""
    pg, errors = page
    server = _serve(state)
    try:
        for rid, has_test in ((run_ids[0], False), (run_ids[1], True)):
            pg.goto(f"{server.base}/runs/{rid}")
            legend = pg.locator('.card[data-metric="accuracy"] .legend')
            legend.wait_for(timeout=60_000)
            names = legend.locator("span").all_inner_texts()
            assert any("validation" in n for n in names), names
            assert any("test" in n for n in names) == has_test, (rid, names)
            if has_test:  # each site's per-round test figure is drawn with its released 95 % interval
                whiskers = pg.locator('.card[data-metric="accuracy"] line.ci[data-series$=" test"]')
                assert whiskers.count() >= 3, whiskers.count()
        assert not errors, errors
    finally:
        server.stop()
