"""MediNet's path in Debian's chromium, each step as a different named user (issue 25):
a researcher signs in, looks at the cohort of the simulated federation (``simulate --cohort-only``
into the state the dashboard serves), designs a model with a live parameter count and ε plan, starts
it (a tiny simulated run), watches it and compares it with an earlier run; an approver marks it valid
and opens its model card; a viewer is refused each action (403). The dashboard is served with an
MLflow tracking URI (``coordinator serve --mlflow``): the run it started is logged there
(``simulate --mlflow``) and "Mark valid" registers the version in MLflow's model registry; last,
both are found in that real MLflow file store, read back with MLflow's own client.

With ``FEDBUS_DASHBOARD_SCREENSHOTS=DIR`` it saves the cohort page, the designer and the model card
as PNGs there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from fedbus.dashboard.server import BackgroundServer, ServeOptions
from fedbus.dashboard.users import MIN_PASSWORD, UsersFile
from tests.dashboard.conftest import EXAMPLE, ROOT, fedbus
from tests.dashboard.test_browser import db_one, shots_dir, wait_for

PASSWORD = "w" * MIN_PASSWORD


@pytest.fixture()
def served(sim_out, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(sim_out, out)
    users = UsersFile(tmp_path / "users.json")
    for name, role in (("rita", "researcher"), ("alan", "approver"), ("vera", "viewer")):
        users.add(name, role, PASSWORD + name)
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")  # the started simulation
    server = BackgroundServer(ServeOptions(state=out / "coordinator", port=0, allow_actions=True, poll_s=0.5,
                                           users_file=tmp_path / "users.json", simulate_out=out,
                                           mlflow=(tmp_path / "mlruns").as_uri())).start()
    try:
        yield server, out / "coordinator"
    finally:
        for child in server.app.state.actions._children:  # the simulation this test started, if still going
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
                child.wait(30)
        server.stop()


def sign_in(page, base, name):
    page.context.clear_cookies()
    page.goto(f"{base}/login")
    page.locator("#user").fill(name)
    page.locator("#password").fill(PASSWORD + name)
    page.locator("#sign-in-user").click()
    page.wait_for_url(f"{base}/runs")
    assert page.locator("#who").inner_text().startswith(name)


def post_status(page, path, body):
    return page.evaluate("""async ([path, body]) => (await fetch(path, {method: "POST", headers: {"Content-Type": "application/json",
        "X-Fedbus-CSRF": document.querySelector('meta[name="fedbus-csrf"]').content}, body: JSON.stringify(body)})).status""",
                         [path, body])


def test_researcher_designs_and_starts_approver_marks_valid_viewer_is_refused(browser, served):
    server, state = served
    base = server.base
    before = {r[0] for r in [db_one(state, "SELECT run_id FROM runs ORDER BY created_at")] if r}
    first_run = db_one(state, "SELECT run_id FROM runs ORDER BY created_at")[0]
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # 0. The researcher looks at the cohort of the simulated federation: per site and pooled, each with its interval.
    fedbus("simulate", str(EXAMPLE), "--sites", "3", "--cohort-only", "--out", str(state.parent))
    [cohort] = [json.loads(p.read_text()) for p in (state / "cohorts").glob("*.json")]
    sign_in(page, base, "rita")
    page.click("header nav >> text=Cohort")
    page.wait_for_url(f"{base}/cohort")
    released = sorted(s for s, v in cohort["sites"].items() if v["status"] == "released")
    assert len(released) == 3 and cohort["pooled"]
    assert page.locator("#cohort-table thead th").all_inner_texts()[1:] == [*released, "pooled"]
    assert page.locator("#cohort-table tbody tr").first.locator("td").all_inner_texts()[1:] == [
        f"{cohort['sites'][s]['table']['n']:.0f}" for s in released] + [f"{cohort['pooled']['n']:.0f}"]
    outcome = next(c for c in cohort["columns"] if c["kind"] == "outcome")["name"]
    cells = page.locator("#cohort-table tbody tr", has_text=f"{outcome}: prevalence").locator("td").all_inner_texts()[1:]
    tables = [cohort["sites"][s]["table"] for s in released] + [cohort["pooled"]["table"]]
    for cell, table in zip(cells, tables, strict=True):
        fig = next(c for c in table["columns"] if c["name"] == outcome)["prevalence"]
        assert cell == f"{fig['value'] * 100:.1f} % ({fig['ci'][0] * 100:.1f}–{fig['ci'][1] * 100:.1f})"
    privacy = page.locator("#cohort-privacy tbody tr").all_inner_texts()
    for site in released:
        assert next(r for r in privacy if r.startswith(site)).split("\t")[2] == f"{cohort['sites'][site]['epsilon']:.3g}"
    if shots_dir():
        page.screenshot(path=str(shots_dir() / "cohort-walk.png"), full_page=True)

    # 1. The researcher designs a model: the parameter count and the ε plan follow each edit.
    page.goto(f"{base}/designer")
    count = page.locator("#param-count")
    page.wait_for_function("() => document.querySelector('#param-count')?.dataset.value", timeout=60_000)
    mlp = int(count.get_attribute("data-value"))
    features = page.locator("#features input")  # the template leaves out the follow-up time (it leaks the outcome)
    assert features.count() == 12 and not page.locator('#features input[value="time"]').is_checked()
    assert page.locator("#features input:checked").count() == 11
    sites = page.locator("#eps-plan tr[data-site]")
    assert sites.count() == 3
    assert all(abs(float(sites.nth(i).locator("td.planned-epsilon").get_attribute("data-epsilon")) - 8.0) < 0.05 for i in range(3))
    page.locator("#total-epsilon").fill("4")
    page.locator("#total-epsilon").dispatch_event("change")
    page.wait_for_function("() => Math.abs(+document.querySelector('#eps-plan td.planned-epsilon')?.dataset.epsilon - 4) < 0.05",
                           timeout=30_000)
    page.locator("#layer-type").select_option("Linear")
    page.locator("#add-layer").click()  # Linear(16) before the output: the output becomes 16 wide, which BCE refuses
    page.wait_for_function("() => document.querySelector('#check-status')?.textContent?.startsWith('invalid')", timeout=30_000)
    assert count.inner_text() == "–"
    n_layers = page.locator("#layers-body tr").count()
    new = page.locator(f'#layers-body tr[data-index="{n_layers - 2}"] input[data-param="out_features"]')
    new.fill("1")
    new.dispatch_event("change")
    page.wait_for_function("(n) => +document.querySelector('#param-count')?.dataset.value === n", arg=mlp + 2, timeout=30_000)
    assert page.locator(f'#layers-body tr[data-index="{n_layers - 2}"] td.layer-params').inner_text() == "2"
    page.locator("#exp-name").fill("designed_mlp")
    page.locator("#exp-name").dispatch_event("change")
    page.locator("#rounds").fill("2")
    page.locator("#rounds").dispatch_event("change")
    page.wait_for_function("() => document.querySelector('#check-status')?.textContent?.startsWith('valid')", timeout=30_000)
    if shots_dir():
        page.screenshot(path=str(shots_dir() / "dashboard-designer.png"), full_page=True)

    # 2. Start it (a tiny simulated run), watch it, compare it with the earlier run.
    page.locator("#start").click()
    page.locator("#watch-run").wait_for(timeout=60_000)
    saved = json.loads((state / "experiments" / "designed_mlp.json").read_text())
    assert saved["training"]["rounds"] == 2 and saved["training"]["optimizer"]["differential_privacy"]["total_epsilon"] == 4
    run = wait_for(lambda: (db_one(state, "SELECT run_id FROM runs WHERE json_extract(experiment_json, '$.basic_info.name') = "
                                          "'designed_mlp'") or [None])[0], 240, "the designed run to be created")
    page.goto(f"{base}/runs/{run}")
    page.wait_for_function(  # the curve grows on the open page, round by round, to the 2 rounds designed
        """() => +(document.querySelector('#chart-accuracy path[data-series="validation (all sites)"]') || {getAttribute: () => 0})
             .getAttribute('data-points') === 2""", timeout=200_000)
    wait_for(lambda: (db_one(state, "SELECT status FROM runs WHERE run_id=?", (run,)) or [None])[0] == "completed", 240,
             "the designed run to complete")
    page.goto(f"{base}/compare?runs={first_run},{run}")
    page.locator("#settings-diff").wait_for(timeout=30_000)
    assert "total_epsilon 8.0 → 4" in page.locator("#settings-diff").inner_text()

    # 3. A viewer is refused each action.
    sign_in(page, base, "vera")
    for path, body in ((f"/api/runs/{run}/approve", {"who": "vera"}), ("/api/runs/start", {"experiment": "designed_mlp.json"}),
                       (f"/api/runs/{run}/stop", {}), ("/api/designer/save", {"experiment": saved})):
        assert post_status(page, path, body) == 403, path
    page.goto(f"{base}/designer")
    page.locator("#save").wait_for(timeout=30_000)
    assert page.locator("#save").is_disabled() and page.locator("#start").is_disabled()

    # 4. The approver marks it valid and opens its model card.
    sign_in(page, base, "alan")
    assert post_status(page, "/api/runs/start", {"experiment": "designed_mlp.json"}) == 403  # approvers do not train
    page.goto(f"{base}/runs/{run}")
    page.locator("#mark-valid").click()
    page.locator("#mlflow-version").wait_for(timeout=60_000)
    assert page.locator("#mlflow-version").inner_text() == "MLflow: designed_mlp version 1"
    page.locator("#model-card-link").click()
    page.locator("#performance").wait_for(timeout=30_000)
    text = page.locator("main").inner_text()
    for title in ("Intended use", "Data", "Performance", "Privacy", "Limitations", "Audit trail"):
        assert title in text
    assert "alan" in text and "the signature verifies" in text and "rita (researcher)" in text  # who started it, in the trail
    eps = json.loads(db_one(state, "SELECT result_json FROM runs WHERE run_id=?", (run,))[0])["privacy"]["epsilon"]
    for site, e in eps.items():
        assert f"{e:.3f}" in page.locator("#privacy").inner_text(), site
    if shots_dir():
        page.screenshot(path=str(shots_dir() / "model-card.png"), full_page=True)
    page.goto(f"{base}/models")
    assert page.locator('#models tr[data-model="designed_mlp"] td.ok').inner_text() == "verifies"
    assert not errors, errors
    assert before  # the earlier runs were there to compare with

    # 5. The run (logged by the started simulation) and the version "Mark valid" registered, in MLflow's
    # file store the dashboard was served with, read back with MLflow's own client.
    from mlflow.tracking import MlflowClient

    from coordinator.model_registry import entry
    from tests.coordinator.test_tracking import check_logged, read_back

    uri = server.opts.mlflow

    def tracked():
        try:
            client, logged = read_back(uri, run)
        except AssertionError:  # not logged yet (the simulation logs it once the run has finished)
            return None
        # the artifacts are logged after the params and metrics (coordinator/tracking.py): wait for them too
        if not {a.path for a in client.list_artifacts(logged.info.run_id)} >= {"model.safetensors", "experiment.json"}:
            return None
        return client, logged

    client, logged = wait_for(tracked, 120, "the started run to be logged to MLflow")
    check_logged(client, logged, state, json.loads((state.parent / "result.json").read_text()))
    assert logged.data.params["training.rounds"] == "2"
    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    [version] = registry.search_model_versions("name='designed_mlp'")
    signed = entry(state, "designed_mlp", 1)["record"]  # the version the approver marked on the page
    assert version.tags["fedbus.version"] == "1" and version.tags["fedbus.run_id"] == run
    assert version.tags["fedbus.approved_by"] == "alan" and version.tags["fedbus.checkpoint_sha256"] == signed["checkpoint_sha256"]
    [model] = list(Path(registry.download_artifacts(version.run_id, "model", str(state.parent / "dl"))).iterdir())
    assert hashlib.sha256(model.read_bytes()).hexdigest() == signed["checkpoint_sha256"]
