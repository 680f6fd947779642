"""End-to-end simulations through the production coordinator and site workers (memory bus)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulator.run import SimulationInputError, simulate

ROOT = Path(__file__).resolve().parents[2]
HEART_FAILURE = ROOT / "examples" / "heart_failure.json"
HEART_DISEASE = ROOT / "examples" / "heart_disease.json"


def test_memory_run_returns_the_design_document_scored_on_held_out_splits():
    doc = simulate(HEART_FAILURE, sites=3, rounds=2, progress=False)
    assert doc["aggregator"] == "FedAvg"
    assert doc["sites"] == ["site-1", "site-2", "site-3"]
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all(r["replies"] == 3 for r in doc["rounds"])
    final = doc["final"]  # what each site reported on its own fixed test split
    assert final["split"] == "test" and set(final["per_site"]) == set(doc["sites"])
    assert sum(m["n_test"] for m in final["per_site"].values()) == final["n_test"]
    assert 0.0 <= final["accuracy"] <= 1.0 and 0.0 <= final["auc"] <= 1.0
    held = doc["holdout"]  # the simulator's own held-out rows, never at any site
    # 299 rows, 20% of each site's rows held out (stratified): the union is exactly those rows.
    assert sum(m["n_test"] for m in held["per_site"].values()) == held["n_test"]
    assert 50 <= held["n_test"] <= 70
    assert "test" not in held["split"] and all("holdout" in r and "test" not in r for r in doc["rounds"])
    # DP is on in this experiment: every site reports a finite, positive epsilon.
    assert set(doc["epsilon"]) == set(doc["sites"])
    assert all(v is not None and 0 < v < math.inf for v in doc["epsilon"].values())
    for key in ("wall_s", "train_s", "communication_s", "aggregation_s"):
        assert doc["timing"][key] >= 0
    assert doc["rejected"] == []


def test_same_seed_gives_the_same_run_and_another_seed_does_not():
    a = simulate(HEART_DISEASE, partition="natural:dataset", rounds=2, seed=7, progress=False)
    b = simulate(HEART_DISEASE, partition="natural:dataset", rounds=2, seed=7, progress=False)
    c = simulate(HEART_DISEASE, partition="natural:dataset", rounds=2, seed=8, progress=False)
    assert a["final"]["loss"] == pytest.approx(b["final"]["loss"], rel=1e-6, abs=1e-9)
    for site in a["final"]["per_site"]:
        assert a["final"]["per_site"][site]["loss"] == pytest.approx(b["final"]["per_site"][site]["loss"], rel=1e-6)
    assert a["final"]["loss"] != pytest.approx(c["final"]["loss"], rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"partition": "bogus"}, "use iid"),
        ({"dataset": "no_such_data"}, "neither a built-in"),
        ({"faults": "crash:site-9@1"}, "not in this run"),
        ({"faults": "meteor:site-1"}, "not understood"),
        ({"broker": "kafka://x"}, "use memory or an amqp"),
        ({"partition": "natural:nope"}, "no column 'nope'"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(kwargs, words):
    with pytest.raises(SimulationInputError, match=words):
        simulate(HEART_FAILURE, sites=2, rounds=1, progress=False, **kwargs)


def test_cli_json_document_report_and_coordinator_state(tmp_path):
    from fedbus.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(
        app, ["simulate", str(HEART_DISEASE), "--partition", "natural:dataset", "--rounds", "2", "--json",
              "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["sites"] == ["cleveland", "hungary", "switzerland", "va-long-beach"]
    assert doc["epsilon"] == {s: None for s in doc["sites"]}  # DP off in this experiment
    for name in ("report.html", "result.json", "experiment.json", "rounds.csv", "sites.csv", "loss.png",
                 "accuracy_auc.png", "model.safetensors", "model_spec.json"):
        assert (out / name).is_file(), name
    assert len((out / "rounds.csv").read_text().strip().splitlines()) == 3  # header + 2 rounds
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2
    assert all(s in page for s in doc["sites"])
    # The coordinator's own state directory holds the run, as for a real run.
    from coordinator.state import StateStore

    store = StateStore(out / "coordinator")
    try:
        assert store.run(doc["run_id"])["status"] == "completed"
        assert {s["site_id"] for s in store.sites()} >= set(doc["sites"])
    finally:
        store.close()
    runner = CliRunner()
    audit = runner.invoke(app, ["coordinator", "audit", doc["run_id"], "--state", str(out / "coordinator")])
    assert audit.exit_code == 0, audit.output
    shown = runner.invoke(app, ["coordinator", "runs", "show", doc["run_id"], "--state", str(out / "coordinator"), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["run_id"] == doc["run_id"]
    exported = runner.invoke(app, ["coordinator", "runs", "export", doc["run_id"], "--state", str(out / "coordinator"),
                                   "--out", str(tmp_path / "export")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_cli_bad_usage_exits_2(tmp_path):
    from fedbus.cli import app

    res = CliRunner().invoke(app, ["simulate", str(tmp_path / "missing.json")])
    assert res.exit_code == 2
    assert "does not exist" in res.output
    res = CliRunner().invoke(app, ["simulate", str(HEART_FAILURE), "--partition", "dirichlet:zero"])
    assert res.exit_code == 2
    assert "ALPHA must be a number" in res.output


def test_site_budget_is_each_simulated_sites_max_epsilon_and_none_means_no_limit(tmp_path):
    """``--site-budget`` writes the hospital's max_epsilon into every site.toml: a run that needs more
    is declined by the sites; without it a simulated site sets no limit (a MediNet export runs)."""
    from simulator.run import SimulationFailed
    from site_worker.config import load_site_config

    with pytest.raises(SimulationFailed, match=r"declined: site-1, site-2"):
        simulate(HEART_FAILURE, sites=2, rounds=1, progress=False, site_budget=0.5, out=tmp_path / "capped")
    configs = sorted((tmp_path / "capped" / "work").glob("*/sites/*/site.toml"))
    assert configs and {load_site_config(c).policy.max_epsilon for c in configs} == {0.5}
    doc = simulate(HEART_FAILURE, sites=2, rounds=1, progress=False, out=tmp_path / "free")
    assert doc["privacy"]["epsilon"]["site-1"] > 0.5
    configs = sorted((tmp_path / "free" / "work").glob("*/sites/*/site.toml"))
    assert configs and {load_site_config(c).policy.max_epsilon for c in configs} == {None}
