"""The run page says what the coordinator saw of each hospital's update (issue 22: "the dashboard
and the result JSON say which runs used it and what the coordinator saw"), in Debian's chromium:
a run under secure aggregation says only sums, with the smallest sum's number of hospitals from
its own result; a plain run says each update was seen in the clear."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from fedbus.dashboard import results
from tests.dashboard.chromium import served_page
from simulator.run import simulate
from tests.dashboard.conftest import EXAMPLE, fedbus


def _experiment(tmp: Path, name: str, secure: bool) -> Path:
    """The plain run without DP (its page must read "no DP"); the secure run with the example's DP
    (its sites release DP metrics: the union comes from the secure sum of their statistics)."""
    doc = json.loads(EXAMPLE.read_text())
    if not secure:
        doc["training"]["optimizer"].pop("differential_privacy")
    doc["federated"]["parameters"].update(min_fit_clients=3, min_available_clients=3, fraction_eval=0.0)
    if secure:
        doc["federated"]["secure_aggregation"] = {"min_contributors": 2, "threshold": 2}
    path = tmp / name
    path.write_text(json.dumps(doc))
    return path


def test_the_run_page_says_what_the_coordinator_saw(browser, tmp_path: Path) -> None:
    out = tmp_path / "out"
    fedbus("simulate", str(_experiment(tmp_path, "plain.json", False)), "--sites", "3", "--rounds", "2", "--out", str(out))
    # the secure run's sites release DP metrics, as a hospital's kit does (the simulator's default is exact)
    simulate(str(_experiment(tmp_path, "secure.json", True)), sites=3, rounds=2, out=str(out), site_metrics="dp",
             progress=False)
    state = out / "coordinator"
    db = sqlite3.connect(state / "coordinator.db")
    try:
        runs = dict(db.execute("SELECT run_id, result_json FROM runs ORDER BY created_at").fetchall())
    finally:
        db.close()
    (plain, _), (secure, secure_result) = list(runs.items())
    stored = json.loads(secure_result)["privacy"]["secure_aggregation"]
    assert stored["used"] is True and stored["sums_unmasked"] == 2, stored
    assert json.loads(secure_result)["final"].get("union_source") == "secure_sum"
    with served_page(browser, state) as (server, page, errors):
        page.goto(f"{server.base}/runs/{secure}")
        line = page.locator("#secure-aggregation")
        line.wait_for(timeout=60_000)
        assert line.get_attribute("data-used") == "true"
        text = line.inner_text()
        assert "only sums of at least 2 hospitals" in text, text
        assert f"{stored['sums_unmasked']} sum(s) unmasked, the smallest of {stored['fewest_contributors']} hospitals" in text
        # the union's test figures say where they come from: the secure sum of the sites' statistics
        assert "from the secure sum" in page.locator("#union-source").inner_text()
        # and so does the headline's majority-class baseline, with its interval (the sites' own noisier
        # baselines once gave a weighted mean far from the union's, e.g. 83 % against a 64 % union)
        note = page.locator("#kpis .baseline").first
        final = json.loads(secure_result)["final"]
        assert float(note.get_attribute("data-value")) == pytest.approx(final["majority_class_accuracy"])
        assert "secure sum of the sites' class counts" in note.inner_text() and "–" in note.inner_text(), note.inner_text()
        # ε this run counts the rounds each site trained with masked updates: a finished run that trained
        # every round spent its plan (it once read only the final test's ε, 1.16 of 8), and at least
        # what the sites' ledgers reported with their last masked update
        ledger = json.loads(secure_result)["epsilon"]
        for site, reported in ledger.items():
            row = page.locator(f'#site-privacy tr[data-site="{site}"]')
            spent = float(row.locator("td.run-epsilon").get_attribute("data-epsilon") or "nan")
            planned = float(row.locator("td.planned-epsilon").get_attribute("data-epsilon") or "nan")
            assert spent == pytest.approx(planned, rel=1e-6) and spent >= reported - 1e-9, (site, spent, planned, reported)
            # a site's first run: its lifetime ledger, after the final test's releases, is this run's ε (it
            # once read the ledger as of the last update, below "ε this run")
            lifetime = float(row.locator("td.site-budget").get_attribute("data-epsilon") or "nan")
            assert lifetime == pytest.approx(spent, rel=1e-6), (site, lifetime, spent)
            # its keys and unmask answers are the protocol, not rejections; its row count stays masked
            assert row.locator("td.rejected").inner_text() == "0" and row.locator("td.examples").inner_text() == "masked"
        assert page.locator("p#rejected").inner_text() == "No message was rejected."
        if os.environ.get("FEDBUS_DASHBOARD_SCREENSHOTS"):
            page.screenshot(path=str(Path(os.environ["FEDBUS_DASHBOARD_SCREENSHOTS"]) / "secure-run.png"))
        page.goto(f"{server.base}/runs/{plain}")
        line = page.locator("#secure-aggregation")
        line.wait_for(timeout=60_000)
        assert line.get_attribute("data-used") == "false" and "in the clear" in line.inner_text()
        assert page.locator("#union-source").count() == 0
        # the plain run neither trains under DP nor spends ε: its privacy figure says so, not
        # "0.00 · planned not planned" from the sites' lifetime ledgers (the secure run's DP)
        kpi = page.locator('.kpi[data-kpi="epsilon"]')
        assert "no DP" in kpi.inner_text() and "not planned" not in kpi.inner_text(), kpi.inner_text()
        assert not errors, errors


def test_a_running_secure_run_says_so_from_its_experiment() -> None:
    """Before its result exists, the experiment's setting speaks; a stored account always wins."""
    exp = {"federated": {"secure_aggregation": {"min_contributors": 3, "threshold": 4}}}
    live = results.secure_of(exp, None)
    assert live["used"] is True and live["min_contributors"] == 3 and live["threshold"] == 4
    assert results.secure_of({"federated": {}}, None)["used"] is False
    assert results.secure_of(exp, {"secure_aggregation": {"used": False}})["used"] is False
