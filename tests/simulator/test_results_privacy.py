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


def test_result_fields_per_site_and_baselines(run):
    doc, _ = run
    final = doc["final"]
    assert final["split"] == "test" and "final_reported_by_sites" in doc
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
        assert len(test) == doc["final"]["per_site"][site]["n_test"]
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
