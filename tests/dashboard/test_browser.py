"""The dashboard in Debian's chromium (Playwright, ``executable_path=/usr/bin/chromium``), while a
``fedbus simulate --out OUT --serve`` federation is running.

What a researcher does in MediNet's walkthrough, checked as they would see it:
* the run page's curve gains points as rounds complete, without a reload;
* the run page's test curve (``federated.test_every`` 1) gains points too, per site as well;
* while the run is live its page says the majority-class baseline is known at the end of the run;
* the finished run's page shows, from its stored result, each site's majority-class baseline beside
  its test accuracy, its personalised accuracy and AUC, and the test-row-weighted baseline headline;
* the sites page shows every enrolled site with the ε it reported against the budget its hello announced;
* compare shows the settings diff against an earlier run ("batch_size 32 → 16");
* "Mark valid" writes a signed record that ``fedbus coordinator audit`` verifies, and
  editing that record makes the audit fail;
* "Stop run" stops the live run after its current round.

Skips where no chromium is installed (fails under CI=true, where .ci/run installs it).
With ``FEDBUS_DASHBOARD_SCREENSHOTS=DIR`` it saves the run and sites pages as PNGs there
(docs/img/ holds the ones in the README).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dashboard.conftest import EXAMPLE, PERSONALIZE, ROOT, experiment_with, fedbus

LIVE_ROUNDS = 40


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def db_one(state: Path, sql: str, args: tuple = ()):
    if not (state / "coordinator.db").exists():
        return None
    db = sqlite3.connect(f"file:{state / 'coordinator.db'}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(sql, args).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """Run A (batch 32, 2 rounds, personalised at the end, finished), then run B (batch 16) live under
    --serve in the same OUT."""
    tmp = tmp_path_factory.mktemp("dash-live")
    out = tmp / "out"
    fedbus("simulate", str(experiment_with(tmp, "a.json", batch_size=32, personalization=PERSONALIZE)), "--sites", "3",
           "--rounds", "2", "--out", str(out), "--site-budget", "10")
    state = out / "coordinator"
    (run_a,) = db_one(state, "SELECT run_id FROM runs")
    slow = experiment_with(tmp, "b.json", federated={"test_every": 1}, batch_size=16, epochs=10)
    log = open(tmp / "serve.log", "w+")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "fedbus.cli", "simulate", str(slow), "--sites", "3", "--rounds",
                             str(LIVE_ROUNDS), "--out", str(out), "--serve", "--serve-port", "0",
                             "--site-budget", "10"],
                            stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT)
    try:
        def url():
            m = re.search(r"dashboard: (http://127\.0\.0\.1:\d+)", (tmp / "serve.log").read_text())
            if proc.poll() is not None:
                raise AssertionError(f"simulate --serve exited {proc.returncode}: {(tmp / 'serve.log').read_text()[-2000:]}")
            return m.group(1) if m else None

        base = wait_for(url, 120, "simulate --serve to print the dashboard URL")
        run_b = wait_for(lambda: (db_one(state, "SELECT run_id FROM runs WHERE run_id != ?", (run_a,)) or [None])[0],
                         180, "the live run to be created")
        yield {"base": base, "state": state, "a": run_a, "b": run_b, "proc": proc, "log": tmp / "serve.log"}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


def rounds_done(state: Path, run_id: str) -> int:
    row = db_one(state, "SELECT COUNT(*) FROM rounds WHERE run_id=?", (run_id,))
    return row[0] if row else 0


def shots_dir() -> Path | None:
    d = os.environ.get("FEDBUS_DASHBOARD_SCREENSHOTS")
    if not d:
        return None
    Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d)


def test_live_dashboard_in_chromium(browser, live):
    state, base, a, b = live["state"], live["base"], live["a"], live["b"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    # 1. The run page's curve gains points while the run goes on.
    wait_for(lambda: rounds_done(state, b) >= 1, 180, "the live run's first round")
    page.goto(f"{base}/runs/{b}")
    path = page.locator('#chart-accuracy path[data-series="validation (all sites)"]')
    path.wait_for(timeout=30_000)
    first = int(path.get_attribute("data-points"))
    assert 1 <= first < LIVE_ROUNDS, "the run must still be going when the page opens"
    page.wait_for_function(
        """(n) => +document.querySelector('#chart-accuracy path[data-series="validation (all sites)"]')
             .getAttribute('data-points') > n""", arg=first, timeout=120_000)
    grown = int(path.get_attribute("data-points"))
    assert grown > first and grown <= rounds_done(state, b)
    assert "live" in page.locator("#live").inner_text()
    # The test curve (federated.test_every 1: the sites score each round on their test split) grows too,
    # all sites combined and per site, and each site's release is listed.
    test_path = page.locator('#chart-accuracy path[data-series="test (all sites)"]')
    seen = int(test_path.get_attribute("data-points"))
    page.wait_for_function(
        """(n) => +document.querySelector('#chart-accuracy path[data-series="test (all sites)"]')
             .getAttribute('data-points') > n""", arg=seen, timeout=120_000)
    assert 1 <= seen < int(test_path.get_attribute("data-points")) <= rounds_done(state, b)
    run_sites = json.loads(db_one(state, "SELECT sites_json FROM runs WHERE run_id=?", (b,))[0])
    for site in run_sites:
        assert int(page.locator(f'#chart-accuracy path[data-series="{site} test"]').get_attribute("data-points")) >= 1
        assert "released" in page.locator(f'#test-releases tr[data-site="{site}"] td.test-status').inner_text()
    page.locator("#site-view").select_option(run_sites[0])
    assert page.locator(f'#chart-auc path[data-series="{run_sites[1]} test"]').count() == 0
    assert int(page.locator(f'#chart-auc path[data-series="{run_sites[0]} test"]').get_attribute("data-points")) >= 1
    page.locator("#site-view").select_option("all")
    # The sites report their baseline with the final evaluation: while live the page says when it comes.
    assert "known at the end of the run" in page.locator("#kpis .baseline").inner_text()
    assert page.locator("#kpis .baseline").get_attribute("data-value") == ""
    assert "known at the end of the run" in page.locator(f'#site-results tr[data-site="{run_sites[0]}"] td.majority').inner_text()
    assert page.locator("#site-results td.personalized-accuracy").count() == 0  # run B does not personalise
    if shots_dir():
        page.wait_for_function("() => +document.querySelector('#chart-accuracy path').getAttribute('data-points') >= 4",
                               timeout=120_000)
        page.screenshot(path=str(shots_dir() / "dashboard-run.png"), full_page=True)

    # 2. The sites page shows every enrolled site with its ε.
    page.goto(f"{base}/sites")
    page.locator("#sites tbody tr").first.wait_for(timeout=30_000)
    enrolled = {r[0] for r in sqlite3.connect(state / "coordinator.db").execute("SELECT site_id FROM sites")}
    rows = page.locator("#sites tbody tr[data-site]")
    shown = {rows.nth(i).get_attribute("data-site"): rows.nth(i).locator("td.epsilon").get_attribute("data-epsilon")
             for i in range(rows.count())}
    assert set(shown) == enrolled and len(enrolled) == 3
    assert all(v and float(v) > 0 for v in shown.values()), shown
    # ... and the budget each announced in its hello (its site.toml's max_epsilon), with ε left.
    import tomllib
    budgets = {}
    for toml in sorted(state.parent.glob("work/*/sites/*/site.toml"), key=lambda p: p.stat().st_mtime):
        doc = tomllib.loads(toml.read_text())
        budgets[doc["site_id"]] = doc["policy"]["max_epsilon"]
    for site in enrolled:
        cell = page.locator(f'#sites tbody tr[data-site="{site}"] td.budget')
        assert float(cell.get_attribute("data-budget")) == budgets[site]
        assert f"of {budgets[site]:.2f}" in cell.inner_text() and "left" in cell.inner_text()
    if shots_dir():
        page.screenshot(path=str(shots_dir() / "dashboard-sites.png"), full_page=True)

    # 3. Compare shows the settings diff between the finished run and the live one.
    page.goto(f"{base}/compare?runs={a},{b}")
    diff = page.locator("#settings-diff")
    diff.wait_for(timeout=30_000)
    epochs_a = json.loads(EXAMPLE.read_text())["training"]["epochs"]  # the finished run kept the example's epochs
    assert "batch_size 32 → 16" in diff.inner_text() and f"epochs {epochs_a} → 10" in diff.inner_text()

    # 4. The finished run: baseline beside accuracy, personalised figures, all from its stored result.
    page.goto(f"{base}/runs/{a}")
    page.locator("#site-results tbody tr").first.wait_for(timeout=30_000)
    final = json.loads(db_one(state, "SELECT result_json FROM runs WHERE run_id=?", (a,))[0])["final"]
    per = final["per_site"]
    assert per and all(m.get("personalized") for m in per.values())
    weighted = sum(m["majority_class_accuracy"] * m["n_test"] for m in per.values()) / sum(m["n_test"] for m in per.values())
    head = page.locator("#kpis .baseline")
    assert float(head.get_attribute("data-value")) == pytest.approx(weighted)
    shown = re.search(r"baseline (\d+\.\d) %", head.inner_text())
    assert shown and abs(float(shown.group(1)) - 100 * weighted) <= 0.05 + 1e-9, head.inner_text()
    assert "majority-class baseline" in head.inner_text() and "weighted by test rows" in head.inner_text()
    assert float(page.locator("#personalized-accuracy").get_attribute("data-value")) == pytest.approx(
        final["personalized"]["accuracy"])
    for site, m in per.items():
        row = page.locator(f'#site-results tr[data-site="{site}"]')
        assert float(row.locator("td.majority").get_attribute("data-value")) == pytest.approx(m["majority_class_accuracy"])
        assert "%" in row.locator("td.majority").inner_text() and "%" in row.locator("td.test-accuracy").inner_text()
        pa, pauc = row.locator("td.personalized-accuracy"), row.locator("td.personalized-auc")
        assert float(pa.get_attribute("data-value")) == pytest.approx(m["personalized"]["accuracy"])
        assert float(pauc.get_attribute("data-value")) == pytest.approx(m["personalized"]["auc"])
        shown_auc = re.fullmatch(r"(\d\.\d\d) \((\d\.\d\d)–(\d\.\d\d)\)", pauc.inner_text())  # "0.97 (0.46–0.99)"
        assert shown_auc, pauc.inner_text()
        point, lo, hi = (float(g) for g in shown_auc.groups())
        assert abs(point - m["personalized"]["auc"]) <= 5e-3 + 1e-9 and lo <= point <= hi, pauc.inner_text()
        flagged = bool(m.get("predicts_one_class")) or m.get("sensitivity") == 0 or m.get("specificity") == 0
        assert row.locator("td.test-accuracy .one-class").count() == int(flagged)

    # 5. Mark valid: a signed record that audit verifies; tampering makes audit fail.
    page.locator("#approver").fill("Dr. Ada Example")
    page.locator("#mark-valid").click()
    page.locator("#approvals li").first.wait_for(timeout=30_000)
    assert "Dr. Ada Example" in page.locator("#approvals").inner_text()
    page.locator("#run-audit").click()
    page.wait_for_function("() => document.querySelector('#audit-status').innerText.includes('verified')", timeout=60_000)
    assert "1 approvals" in page.locator("#audit-status").inner_text()
    ok = fedbus("coordinator", "audit", a, "--state", str(state), "--json", check=False)
    assert ok.returncode == 0 and json.loads(ok.stdout)["approvals_verified"] == 1
    record = state / "approvals" / f"{a}.json"
    kept = record.read_bytes()
    record.write_text(record.read_text().replace("Dr. Ada Example", "Dr. Mallory"))
    bad = fedbus("coordinator", "audit", a, "--state", str(state), "--json", check=False)
    assert bad.returncode == 1 and any("changed after signing" in p for p in json.loads(bad.stdout)["problems"])
    record.write_bytes(kept)

    assert not [e for e in errors if "favicon" not in e], errors

    # 6. Stop the live run from its page: it ends "stopped" before its last round.
    assert db_one(state, "SELECT status FROM runs WHERE run_id=?", (b,))[0] == "running"
    page.goto(f"{base}/runs/{b}")
    page.locator("#stop-run").click()
    page.wait_for_function("() => document.querySelector('#action-status').innerText.includes('stop requested')",
                           timeout=30_000)
    live["proc"].wait(180)
    status, reason = db_one(state, "SELECT status, reason FROM runs WHERE run_id=?", (b,))
    assert status == "stopped" and "dashboard" in reason and rounds_done(state, b) < LIVE_ROUNDS
