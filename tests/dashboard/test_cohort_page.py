"""The dashboard's Cohort page in Debian's chromium (Playwright), over a cohort table that
``fedbus simulate --cohort-only --out OUT`` kept for the four heart-disease hospitals.

Checked as a researcher sees it: the Cohort link in the navigation, one column per hospital plus
the pooled one, the pooled row count and prevalence as the stored document has them, a histogram
per bounded numeric column for every hospital and the pool (one bar per bin), each site's ε with
δ and accountant, and the JSON twin. With ``FEDBUS_DASHBOARD_SCREENSHOTS=DIR`` it saves the page
as DIR/cohort.png (docs/img/cohort.png).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dashboard.conftest import ROOT, fedbus

EXAMPLE = ROOT / "examples" / "heart_disease.json"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort-page") / "out"
    fedbus("simulate", str(EXAMPLE), "--partition", "natural:dataset", "--cohort-only", "--out", str(out))
    doc = json.loads(next((out / "coordinator" / "cohorts").glob("*.json")).read_text())
    log = open(out / "serve.log", "w+")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with socket.socket() as sock:  # a free port (serve prints the port it was given)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fedbus.cli", "coordinator", "serve", "--state",
                             str(out / "coordinator"), "--port", str(port)], stderr=log, stdout=log, env=env, cwd=ROOT)
    try:
        deadline, base = time.monotonic() + 90, None
        while base is None and time.monotonic() < deadline:
            m = re.search(r"dashboard: (http://127\.0\.0\.1:\d+)", (out / "serve.log").read_text())
            base = m.group(1) if m else None
            if base is None:
                assert proc.poll() is None, (out / "serve.log").read_text()
                time.sleep(0.2)
        assert base, "the dashboard never printed its URL"
        yield base, doc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_cohort_page_shows_the_table_histograms_and_privacy(served, browser):  # noqa: F811
    base, doc = served
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{base}/runs")
    page.click("header nav >> text=Cohort")
    page.wait_for_url(f"{base}/cohort")
    heads = page.locator("#cohort-table thead th").all_inner_texts()[1:]
    assert heads == [*sorted(doc["sites"]), "pooled"]
    n_row = page.locator("#cohort-table tbody tr").first.locator("td").all_inner_texts()
    assert n_row[-1] == f"{doc['pooled']['n']:.0f}"
    prevalence = page.locator("#cohort-table tbody tr", has_text="num: prevalence").locator("td").all_inner_texts()
    fig = next(c for c in doc["pooled"]["table"]["columns"] if c["name"] == "num")["prevalence"]
    assert prevalence[-1] == f"{fig['value'] * 100:.1f} % ({fig['ci'][0] * 100:.1f}–{fig['ci'][1] * 100:.1f})"
    bounded = [c["name"] for c in doc["columns"] if c.get("bounds")]
    cards = page.locator(".histograms")
    assert cards.count() == len(bounded)
    for name in bounded:
        card = page.locator(f'.histograms[data-column="{name}"]')
        assert card.locator("svg").count() == len(doc["sites"]) + 1
        assert card.locator("svg").first.locator("rect").count() == doc["bins"]
    privacy = page.locator("#cohort-privacy tbody tr").all_inner_texts()
    for site, v in doc["sites"].items():
        row = next(r for r in privacy if r.startswith(site))
        assert f"{v['epsilon']:.3g}" in row and f"{v['delta']:g}" in row and "rdp" in row
    assert page.request.get(f"{base}/api/cohort").json()["cohort"]["cohort_id"] == doc["cohort_id"]
    shots = os.environ.get("FEDBUS_DASHBOARD_SCREENSHOTS")
    if shots:
        page.screenshot(path=str(Path(shots) / "cohort.png"), full_page=True)
    page.close()
