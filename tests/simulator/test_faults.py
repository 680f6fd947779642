"""Fault injection: spec parsing, and faults observed through real simulated runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulator.faults import FaultPlan, FaultSpecError, parse_faults
from simulator.run import simulate

HEART_DISEASE = Path(__file__).resolve().parents[2] / "examples" / "heart_disease.json"


def test_parse_every_fault_kind():
    plan = parse_faults(
        "dropout:0.2, straggler:site-2:3, straggler:site-3:exp:1.5; straggler:*:uniform:0:2,"
        "crash:site-4@2, byzantine:site-1:flip, byzantine:site-5:scale:50",
        seed=3,
    )
    assert plan.dropout == 0.2
    assert [(s.site, s.dist, s.a, s.b) for s in plan.stragglers] == [
        ("site-2", "fixed", 3.0, 0.0), ("site-3", "exp", 1.5, 0.0), ("*", "uniform", 0.0, 2.0)]
    assert plan.crashes == {"site-4": 2}
    assert [(b.site, b.mode, b.factor) for b in plan.byzantine] == [("site-1", "flip", 10.0), ("site-5", "scale", 50.0)]
    assert plan.sites_named() == {"site-1", "site-2", "site-3", "site-4", "site-5"}
    assert plan.straggler_for("site-9").site == "*"  # the wildcard applies to everyone else
    assert FaultPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan  # how site processes get it
    assert parse_faults(None).empty and parse_faults("  ").empty


@pytest.mark.parametrize("spec, words", [
    ("dropout:1.5", "P must be in"), ("dropout:x", "could not convert"), ("crash:site-1", "not understood"),
    ("crash:site-1@0", "ROUND must be >= 1"), ("straggler:site-1:uniform:3:1", "LO <= HI"),
    ("byzantine:site-1:poison", "not understood"), ("straggler:site-1:-2", "delays must be >= 0"),
])
def test_bad_fault_specs_say_what_is_accepted(spec, words):
    with pytest.raises(FaultSpecError, match=words):
        parse_faults(spec)


def test_dropout_draws_are_seeded_per_round_site_and_attempt():
    plan = parse_faults("dropout:0.5", seed=1)
    draws = [plan.drops(r, f"site-{i}") for r in range(1, 30) for i in range(4)]
    assert draws == [parse_faults("dropout:0.5", seed=1).drops(r, f"site-{i}") for r in range(1, 30) for i in range(4)]
    assert 0.35 < sum(draws) / len(draws) < 0.65
    assert any(plan.drops(r, "site-1", 0) != plan.drops(r, "site-1", 1) for r in range(1, 30))


def _experiment(aggregator: str, **params) -> dict:
    raw = json.loads(HEART_DISEASE.read_text())
    raw["federated"]["name"] = aggregator
    raw["federated"]["parameters"].update(params)
    return raw


@pytest.mark.slow
def test_a_byzantine_site_breaks_fedavg_and_fedmedian_resists():
    kwargs = dict(sites=5, partition="iid", rounds=3, faults="byzantine:site-1:flip", progress=False)
    broken = simulate(_experiment("FedAvg"), **kwargs)
    robust = simulate(_experiment("flower:FedMedian"), **kwargs)
    events = broken["faults"]["events"]
    assert {e["site"] for e in events} == {"site-1"} and len(events) == 3  # one poisoned update per round
    assert broken["rejected"] == []  # validly signed by the site's own key: only robustness helps
    assert broken["final"]["accuracy"] < 0.5
    assert robust["final"]["accuracy"] > 0.75
    assert robust["final"]["auc"] > broken["final"]["auc"] + 0.3


@pytest.mark.slow
def test_a_site_crashing_mid_run_leaves_the_others_to_finish_at_the_deadline():
    doc = simulate(HEART_DISEASE, sites=3, partition="iid", rounds=3, faults="crash:site-3@2",
                   round_timeout_s=6.0, progress=False)
    assert [r["replies"] for r in doc["rounds"]] == [3, 2, 2]
    assert doc["faults"]["events"] == [{"kind": "crash", "site": "site-3", "round": 2}]
    assert doc["final"]["accuracy"] > 0.7


@pytest.mark.slow
def test_dropouts_are_missing_replies_and_stragglers_are_waited_for():
    doc = simulate(HEART_DISEASE, sites=4, partition="iid", rounds=3, faults="dropout:0.3,straggler:site-2:1.0",
                   round_timeout_s=6.0, seed=5, progress=False)
    events = doc["faults"]["events"]
    drops = [e for e in events if e["kind"] == "dropout"]
    late = [e for e in events if e["kind"] == "straggler"]
    assert drops, "seed 5 drops at least one site in three rounds"
    assert all(e["site"] == "site-2" and e["delay_s"] == 1.0 for e in late)
    for r in doc["rounds"]:
        dropped = {e["site"] for e in drops if e["round"] == r["round"]}
        assert r["replies"] == 4 - len(dropped)
        if "site-2" not in dropped:
            assert r["wall_s"] >= 1.0  # a synchronous round waits for its straggler
