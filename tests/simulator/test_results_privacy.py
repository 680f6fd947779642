"""A simulated run's results say what they are: test = the fixed held-out rows, the privacy
plan is what the sites' own ledgers spent, personalised models sit beside the global one."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from simulator.run import simulate

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"accuracy", "auc", "f1", "sensitivity", "specificity", "n_test"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    doc = json.loads((ROOT / "examples" / "heart_failure.json").read_text())
    doc["training"]["rounds"] = 3
    doc["training"]["personalization"] = {"mode": "last_layer", "epochs": 2}
    doc["federated"]["name"] = "FedPer"
    doc["federated"]["parameters"]["personal_layers"] = 1
    out = tmp_path_factory.mktemp("sim")
    result = simulate(doc, sites=3, progress=False, baselines=True, out=out)
    return result, out


def test_planned_epsilon_equals_what_the_site_ledgers_spent(run):
    doc, _ = run
    privacy = doc["privacy"]
    assert privacy["delta"] == 1e-5 and privacy["accountant"] == "rdp" and privacy["total_epsilon"] == 8.0
    for site in doc["sites"]:
        # three rounds and the fine-tune, all inside the one plan
        assert abs(privacy["planned_epsilon"][site] - privacy["epsilon"][site]) < 1e-6
        assert privacy["epsilon"][site] <= 8.0
        assert privacy["run_epsilon"][site] == pytest.approx(privacy["epsilon"][site], abs=1e-9)
    assert doc["epsilon"] == privacy["epsilon"]


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory):
    """No total_epsilon: a fixed noise multiplier per task, mini-batches (sample rate below 1, so
    each site's own training rows set its steps), a fine-tune after three rounds."""
    doc = json.loads((ROOT / "examples" / "heart_failure.json").read_text())
    dp = doc["training"]["optimizer"]["differential_privacy"]
    dp.pop("total_epsilon")
    dp["noise_multiplier"] = 1.5
    doc["training"].update(rounds=3, batch_size=16)
    doc["training"]["personalization"] = {"mode": "last_layer", "epochs": 2}
    return simulate(doc, sites=3, progress=False, baselines=False, out=tmp_path_factory.mktemp("sim-noise"))


def test_a_noise_multiplier_run_is_planned_and_spends_its_plan(noise_run):
    privacy = noise_run["privacy"]
    assert privacy["mode"] == "noise_multiplier" and privacy["total_epsilon"] is None
    assert privacy["delta"] == 1e-5 and privacy["accountant"] == "rdp"
    rates = {p["sample_rate"] for p in privacy["plan"].values()}
    assert max(rates) < 1.0
    for site in noise_run["sites"]:
        assert abs(privacy["planned_epsilon"][site] - privacy["epsilon"][site]) < 1e-6
        assert privacy["run_epsilon"][site] == pytest.approx(privacy["epsilon"][site], abs=1e-9)
        assert privacy["noise_multiplier"][site] == 1.5


def test_the_results_table_shows_the_plan_without_total_epsilon(noise_run):
    import io

    from rich.console import Console

    from simulator.table import print_results

    buf = io.StringIO()
    print_results(noise_run, console=Console(file=buf, width=200))
    line = next(x for x in buf.getvalue().splitlines() if x.startswith("privacy:"))
    planned = noise_run["privacy"]["planned_epsilon"]
    assert line == ("privacy: ε per site at δ = 1e-05 (rdp accountant); planned "
                    + ", ".join(f"{s} {planned[s]:.3f}" for s in sorted(planned)))


def test_result_fields_per_site_and_baselines(run):
    doc, _ = run
    final = doc["final"]
    assert final["split"] == "test" and doc["holdout"]["split"].startswith("simulator held-out")
    for site in doc["sites"]:
        m = final["per_site"][site]
        assert FIELDS <= set(m) and "majority_class_accuracy" in m
        assert FIELDS <= set(m["personalized"])
        assert m["personalized"]["n_test"] == m["n_test"]
        assert FIELDS <= set(doc["baselines"]["local"][site])
    assert FIELDS <= set(doc["baselines"]["pooled"])
    assert "FedPer" in final["personalized"]["method"] and "mean_accuracy" in final["personalized"]


def test_test_rows_never_reached_training(run):
    doc, out = run
    work = next((out / "work").iterdir())
    for site in doc["sites"]:
        train = pd.read_csv(work / "sites" / site / "data" / "train.csv")
        test = pd.read_csv(work / "holdout" / f"{site}_test.csv")
        assert len(test) == doc["holdout"]["per_site"][site]["n_test"]
        # no held-out row is in the file the site trains on (rows are unique records)
        both = train.merge(test, how="inner", on=list(test.columns))
        assert both.empty
        # and the site's config names only its training file
        assert "holdout" not in (work / "sites" / site / "site.toml").read_text()


def test_runs_show_labels_validation_and_test(run):
    from coordinator.results import show_run
    from coordinator.state import StateStore

    doc, out = run
    store = StateStore(out / "coordinator")
    try:
        shown = show_run(store, doc["run_id"])
    finally:
        store.close()
    assert shown["rounds_split"] == "validation" and shown["final"]["split"] == "test"
    # the sites' own final test evaluation covers their fixed test rows, not the simulator's holdout
    assert set(shown["final"]["per_site"]) == set(doc["sites"])
    assert shown["privacy"]["delta"] == 1e-5 and set(shown["privacy"]["epsilon"]) == set(doc["sites"])
    best = shown["best_round"]
    assert best["validation_loss"] == min(r["loss"] for r in shown["rounds"])


def test_one_runs_test_figures_agree_between_simulate_and_runs_show(run):
    from typer.testing import CliRunner

    from fedbus.cli import app

    doc, out = run
    res = CliRunner().invoke(app, ["coordinator", "runs", "show", doc["run_id"], "--state", str(out / "coordinator"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout.strip().splitlines()[0])
    assert shown["final"]["split"] == doc["final"]["split"] == "test"
    for k in ("accuracy", "auc", "f1", "loss", "n_test", "majority_class_accuracy"):
        assert shown["final"][k] == doc["final"][k], k
    for site in doc["sites"]:
        a, b = doc["final"]["per_site"][site], shown["final"]["per_site"][site]
        assert {k: a[k] for k in FIELDS} == {k: b[k] for k in FIELDS}
        assert a["personalized"] == b["personalized"]
    # the simulator's own held-out rows are named so, and are other figures
    assert "holdout" not in shown and doc["holdout"]["n_test"] != doc["final"]["n_test"]
    cmp = CliRunner().invoke(app, ["coordinator", "runs", "compare", doc["run_id"], doc["run_id"], "--state",
                                   str(out / "coordinator"), "--json"])
    assert cmp.exit_code == 0, cmp.output
    both = json.loads(cmp.stdout.strip().splitlines()[0])
    assert both["final_split"] == "test" and both["rounds_split"] == "validation"
    assert both["final"]["accuracy"] == [doc["final"]["accuracy"]] * 2
    assert both["final"]["personalized_accuracy"] == [doc["final"]["personalized"]["accuracy"]] * 2


def test_personalised_models_are_also_scored_on_the_held_out_rows_beside_local_only(run):
    doc, _ = run
    held = doc["holdout"]
    for site in doc["sites"]:
        p = held["per_site"][site]["personalized"]
        assert FIELDS <= set(p) and p["n_test"] == held["per_site"][site]["n_test"]
        assert FIELDS <= set(doc["baselines"]["local"][site])  # the local-only model on the same rows
    assert "mean_accuracy" in held["personalized"]


def test_site_reported_test_rows_are_the_sites_fixed_split_never_trained_on(run):
    from protocol.config import load_experiment
    from simulator.personal_eval import site_data
    from site_worker.config import load_site_config

    doc, out = run
    exp = load_experiment(json.loads((out / "experiment.json").read_text()))
    work = next((out / "work").iterdir())
    for site in doc["sites"]:
        data = site_data(load_site_config(work / "sites" / site / "site.toml"), exp, (11,))
        assert doc["final"]["per_site"][site]["n_test"] == len(data.x_test)
        assert doc["final"]["per_site"][site]["personalized"]["n_test"] == len(data.x_test)
        train = {r.tobytes() for r in data.x_train.numpy()}
        assert not any(r.tobytes() in train for r in data.x_test.numpy())
