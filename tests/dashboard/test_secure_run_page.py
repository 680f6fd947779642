"""The run page says what the coordinator saw of each hospital's update (issue 22: "the dashboard
and the result JSON say which runs used it and what the coordinator saw"), in Debian's chromium:
a run under secure aggregation says only sums, with the smallest sum's number of hospitals from
its own result; a plain run says each update was seen in the clear."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from fedbus.dashboard import results
from fedbus.dashboard.server import BackgroundServer, ServeOptions
from tests.dashboard.conftest import EXAMPLE, fedbus


def _experiment(tmp: Path, name: str, secure: bool) -> Path:
    doc = json.loads(EXAMPLE.read_text())
    doc["training"]["optimizer"].pop("differential_privacy")  # fast; what the page says does not depend on it
    doc["federated"]["parameters"].update(min_fit_clients=3, min_available_clients=3, fraction_eval=0.0)
    if secure:
        doc["federated"]["secure_aggregation"] = {"min_contributors": 2, "threshold": 2}
    path = tmp / name
    path.write_text(json.dumps(doc))
    return path


def test_the_run_page_says_what_the_coordinator_saw(browser, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for name, secure in (("plain.json", False), ("secure.json", True)):
        fedbus("simulate", str(_experiment(tmp_path, name, secure)), "--sites", "3", "--rounds", "2", "--out", str(out))
    state = out / "coordinator"
    db = sqlite3.connect(state / "coordinator.db")
    try:
        runs = dict(db.execute("SELECT run_id, result_json FROM runs ORDER BY created_at").fetchall())
    finally:
        db.close()
    (plain, _), (secure, secure_result) = list(runs.items())
    stored = json.loads(secure_result)["privacy"]["secure_aggregation"]
    assert stored["used"] is True and stored["sums_unmasked"] == 2, stored
    server = BackgroundServer(ServeOptions(state=state, port=0)).start()
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{server.base}/runs/{secure}")
        line = page.locator("#secure-aggregation")
        line.wait_for(timeout=60_000)
        assert line.get_attribute("data-used") == "true"
        text = line.inner_text()
        assert "only sums of at least 2 hospitals" in text, text
        assert f"{stored['sums_unmasked']} sum(s) unmasked, the smallest of {stored['fewest_contributors']} hospitals" in text
        if os.environ.get("FEDBUS_DASHBOARD_SCREENSHOTS"):
            page.screenshot(path=str(Path(os.environ["FEDBUS_DASHBOARD_SCREENSHOTS"]) / "secure-run.png"))
        # neither run trains under DP nor spends ε: the privacy figure says so, not "0.00 · planned not planned"
        kpi = page.locator('.kpi[data-kpi="epsilon"]')
        assert "no DP" in kpi.inner_text() and "not planned" not in kpi.inner_text(), kpi.inner_text()
        page.goto(f"{server.base}/runs/{plain}")
        line = page.locator("#secure-aggregation")
        line.wait_for(timeout=60_000)
        assert line.get_attribute("data-used") == "false" and "in the clear" in line.inner_text()
        assert not errors, errors
    finally:
        page.close()
        server.stop()


def test_a_running_secure_run_says_so_from_its_experiment() -> None:
    """Before its result exists, the experiment's setting speaks; a stored account always wins."""
    exp = {"federated": {"secure_aggregation": {"min_contributors": 3, "threshold": 4}}}
    live = results.secure_of(exp, None)
    assert live["used"] is True and live["min_contributors"] == 3 and live["threshold"] == 4
    assert results.secure_of({"federated": {}}, None)["used"] is False
    assert results.secure_of(exp, {"secure_aggregation": {"used": False}})["used"] is False
