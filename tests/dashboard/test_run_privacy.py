"""The run page's ε: this run's plan from the first second (before any round), this run's
spend apart from each site's lifetime ledger, and the plan the coordinator's planner makes
(the one ``site check`` and the sites use), so the page and the coordinator agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator import privacy_plan as plans
from coordinator.state import StateStore
from fedbus.dashboard import views
from fedbus.dashboard.data import StateReader
from protocol.config import load_experiment
from protocol.policy import SitePolicy
from protocol.signing import Signer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "heart_failure.json"


def _hello(site: str, rows: int) -> dict:
    return {"site_id": site, "software_version": "x", "policy": SitePolicy(max_epsilon=40.0, max_sample_rate=1.0).summary(),
            "datasets": [{"name": "heart_failure", "rows": rows, "columns": ["age", "DEATH_EVENT"],
                          "feature_types": {"age": "numeric"}, "target": "DEATH_EVENT", "epsilon_spent": 17.5}]}


def _running(tmp: Path, experiment: dict) -> tuple[Path, str]:
    store = StateStore(tmp / "state")
    for site, rows in (("h1", 100), ("h2", 99)):
        store.enroll(site, Signer.generate().public_pem())
        store.record_hello(site, _hello(site, rows))
    run_id = "r-" + tmp.name[-8:]
    store.create_run(run_id=run_id, federation="f", aggregator="FedAvg", experiment=experiment, seed=1, rounds=15,
                     sites=["h1", "h2"], coordinator_kid=None)
    store.close()
    return tmp / "state", run_id


def test_a_dp_run_shows_its_plan_before_round_1(tmp_path: Path) -> None:
    doc = json.loads(EXAMPLE.read_text())
    state, run_id = _running(tmp_path, doc)
    page = views.run_doc(StateReader(state), run_id)
    assert page["rounds_done"] == 0 and page["status"] == "running"
    privacy = page["privacy"]
    want = plans.planned_epsilon(plans.plan(load_experiment(doc), {s: _hello(s, r) for s, r in (("h1", 100), ("h2", 99))}))
    assert privacy["planned_epsilon"] == pytest.approx(want)
    assert privacy["total_epsilon"] == 8.0 and all(0 < v <= 8.0 + 1e-9 for v in want.values())
    assert privacy["run_spent_epsilon"] == {"h1": pytest.approx(0.0, abs=1e-6), "h2": pytest.approx(0.0, abs=1e-6)}
    by_site = {s["site"]: s for s in page["sites"]}
    assert by_site["h1"]["planned_epsilon"] == pytest.approx(want["h1"]) and by_site["h1"]["budget"] == 40.0


def test_a_run_without_dp_has_no_plan(tmp_path: Path) -> None:
    doc = json.loads(EXAMPLE.read_text())
    del doc["training"]["optimizer"]["differential_privacy"]
    state, run_id = _running(tmp_path, doc)
    privacy = views.run_doc(StateReader(state), run_id)["privacy"]
    assert not privacy.get("planned_epsilon") and privacy["run_spent_epsilon"] == {}


def test_this_runs_spend_grows_with_the_rounds_trained_up_to_the_plan() -> None:
    exp = load_experiment(json.loads(EXAMPLE.read_text()))
    hello = _hello("h1", 100)
    planned = plans.planned_epsilon(plans.plan(exp, {"h1": hello}))["h1"]
    spent = [plans.run_spent(exp, hello, rounds_trained=k, finished=False) for k in (1, 5, 15)]
    assert spent == sorted(spent) and spent[0] > 0 and spent[-1] < planned
    assert plans.run_spent(exp, hello, rounds_trained=15, finished=True) == pytest.approx(planned, rel=1e-9)
    # Nothing released before the first round, a fine-tune after the rounds included (it comes at the end).
    tuned = json.loads(EXAMPLE.read_text())
    tuned["training"]["personalization"] = {"mode": "last_layer", "epochs": 1}
    tuned_exp = load_experiment(tuned)
    assert plans.run_spent(tuned_exp, hello, rounds_trained=0, finished=False) == pytest.approx(0.0, abs=1e-9)
    assert plans.run_spent(tuned_exp, hello, rounds_trained=0, finished=True) > 0
    # Two runs of the same settings at the same site: the same run ε, whatever the lifetime ledger says.
    older = {**hello, "datasets": [{**hello["datasets"][0], "epsilon_spent": 39.0}]}
    assert plans.run_spent(exp, older, rounds_trained=15, finished=True) == pytest.approx(planned, rel=1e-9)


def test_a_site_planned_before_its_hello_gets_the_planners_figure_from_its_hello(tmp_path: Path) -> None:
    """The README deployment starts the sites and the coordinator together: the coordinator
    planned h2 before h2's hello arrived ("no dataset announced"). The finished run's page shows
    h1's planned ε as the result holds it and h2's from the one planner on h2's hello, never
    "not planned"; a site the result planned keeps the result's figure."""
    doc = json.loads(EXAMPLE.read_text())
    state, run_id = _running(tmp_path, doc)
    full = plans.plan(load_experiment(doc), {s: _hello(s, r) for s, r in (("h1", 100), ("h2", 99))})
    early = plans.plan(load_experiment(doc), {"h1": _hello("h1", 100), "h2": None})
    assert "error" in early["sites"]["h2"]
    store = StateStore(state)
    store.finish_run(run_id, status="completed", reason=None, result={"privacy": {
        "plan": early["sites"], "planned_epsilon": plans.planned_epsilon(early), "total_epsilon": 8.0,
        "delta": early["delta"], "accountant": early["accountant"], "epsilon": {}}})
    store.close()
    privacy = views.run_doc(StateReader(state), run_id)["privacy"]
    assert privacy["planned_epsilon"]["h1"] == pytest.approx(plans.planned_epsilon(early)["h1"])
    assert privacy["planned_epsilon"]["h2"] == pytest.approx(plans.planned_epsilon(full)["h2"])
