"""The whole-run ε plan when the experiment fixes each task's noise (no total_epsilon): shown
before round 1, stored with the result, and equal to what the sites' own ledgers spent."""

from __future__ import annotations

import uuid

import pytest

from coordinator import privacy_plan
from coordinator.run import Coordinator
from coordinator.state import StateStore
from protocol import privacy_plan as shared_plan
from protocol.accounting import epsilon_of, merge
from protocol.config import load_experiment
from protocol.dp_plan import plan_dp
from protocol.policy import SitePolicy
from protocol.transport import open_bus
from protocol.transport.base import Topology
from site_worker.ledger import PrivacyLedger
from site_worker.run_budget import run_spent
from tests.coordinator.test_personalize_sites import personalised_experiment, start_sites


def _experiment(**dp) -> dict:
    doc = personalised_experiment(rounds=3)
    doc["training"]["optimizer"]["differential_privacy"] = {"max_grad_norm": 1.0, "delta": 1e-5, **dp}
    doc["federated"]["parameters"]["fraction_eval"] = 1.0  # an evaluation release per round too
    doc["federated"]["test_every"] = 1  # and a test release after rounds 1 and 2
    return doc


def _hello(rows: int, **policy) -> dict:
    return {"datasets": [{"name": "heart_failure", "rows": rows}], "policy": SitePolicy(**policy).summary()}


def test_plan_and_its_lines_without_total_epsilon():
    exp = load_experiment(_experiment(noise_multiplier=1.3))
    planned = privacy_plan.plan(exp, {"a": _hello(100, max_sample_rate=1.0),
                                      "b": _hello(100, max_sample_rate=1.0, min_noise_multiplier=2.0)})
    assert planned["mode"] == "noise_multiplier" and planned["total_epsilon"] is None
    a = planned["sites"]["a"]
    want = shared_plan.plan_run(exp, n_train=a["n_train"], delta=1e-5, policy=SitePolicy())
    # 3 rounds + the fine-tune at σ 1.3, 3 validation + 3 with-update + 2 test + 1 final metrics releases
    assert want.entries() == merge([(1.3, want.sample_rate, want.total_steps), (5.0, 1.0, 9)])
    assert a["planned_epsilon"] == pytest.approx(want.planned_epsilon, abs=1e-12)
    # site b's policy refuses σ 1.3: the site declines every task, so the plan says so, with no figure
    assert "planned_epsilon" not in planned["sites"]["b"]
    assert privacy_plan.planned_epsilon(planned) == {"a": a["planned_epsilon"], "b": None}
    lines = privacy_plan.describe(planned)
    assert lines[0] == ("privacy plan: no total_epsilon; ε at the end of the run per site at δ = 1e-05 (rdp "
                        "accountant), composed over every round's DP-SGD steps, the fine-tune and the metrics releases")
    assert lines[1] == (f"  a: {a['n_train']} training rows, {a['steps']} DP-SGD steps at sample rate 1, noise "
                        f"σ = 1.300 -> ε = {a['planned_epsilon']:.3f}")
    assert lines[2].startswith("  b: the site declines: min_noise_multiplier: noise multiplier 1.3 is below")


def test_a_sampled_run_says_its_plan_is_an_upper_bound():
    doc = _experiment(noise_multiplier=1.3)
    full = privacy_plan.plan(load_experiment(doc), {"a": _hello(100, max_sample_rate=1.0)})
    assert "upper_bound" not in full and not any("upper bound" in line for line in privacy_plan.describe(full))
    doc["federated"]["parameters"].update(fraction_fit=0.5, min_fit_clients=1)
    planned = privacy_plan.plan(load_experiment(doc), {"a": _hello(100, max_sample_rate=1.0)})
    # the same figure (every round counted), now labelled as a bound
    assert planned["sites"]["a"]["planned_epsilon"] == pytest.approx(full["sites"]["a"]["planned_epsilon"], abs=1e-12)
    assert privacy_plan.describe(planned)[-1] == ("  an upper bound: fraction_fit 0.5 < 1: the plan counts every "
                                                  "round at every site; a site sampled less spends less")


def test_target_epsilon_per_task_plans_the_fine_tune_at_its_own_noise():
    doc = _experiment(target_epsilon=1.0)
    doc["training"]["personalization"]["epochs"] = 7  # not the rounds' epochs: its own σ
    exp = load_experiment(doc)
    planned = privacy_plan.plan(exp, {"a": _hello(100, max_sample_rate=1.0)})
    a = planned["sites"]["a"]
    assert planned["mode"] == "target_epsilon"
    spec, tune = shared_plan.task_specs(exp)
    round_plan, tune_plan = (plan_dp(s, a["n_train"], delta=1e-5, accountant="rdp") for s in (spec, tune))
    assert a["noise_multiplier"] == round_plan.noise_multiplier
    assert a["personalization_noise_multiplier"] == tune_plan.noise_multiplier != round_plan.noise_multiplier
    rounds = int(exp.training.rounds)
    composed = merge([(round_plan.noise_multiplier, 1.0, round_plan.steps)] * rounds
                                + tune_plan.entries() + [(5.0, 1.0, 2 * rounds + 2 + 1)])
    assert a["planned_epsilon"] == pytest.approx(epsilon_of(composed, delta=1e-5, accountant="rdp"), abs=1e-9)
    # each task alone is within its target; the run composes them
    assert a["planned_epsilon"] > 1.0
    assert "fine-tune σ" in privacy_plan.describe(planned)[1]


@pytest.mark.slow
def test_noise_multiplier_run_spends_exactly_its_plan(tmp_path, capsys):
    """Real site workers with DP metrics: the plan from announced rows, shown before round 1, is
    what each ledger holds at the end (full-batch DP-SGD: the sample rate does not depend on
    how many rows the keyed split put in training)."""
    url = f"memory://plan-{uuid.uuid4().hex[:8]}"
    fed = f"fed-{uuid.uuid4().hex[:8]}"
    signer, state, sites, workers, configs, _ = start_sites(tmp_path, url, fed, policy={"metrics": "dp"})
    bus = open_bus(url)
    bus.declare(Topology(sites=sites, federations=[fed]))
    for w in workers:
        w.start()
    try:
        exp = _experiment(noise_multiplier=1.5)
        result = Coordinator(exp, bus=bus, state_dir=state, signer=signer, federation=fed, progress=True).run()
    finally:
        for w in workers:
            w.stop(grace_s=2)
        bus.close()
    assert result.ok, result.reason
    doc = result.to_json()
    privacy = doc["privacy"]
    assert privacy["mode"] == "noise_multiplier" and privacy["total_epsilon"] is None
    assert privacy["delta"] == 1e-5 and privacy["accountant"] == "rdp"
    for site in sites:
        ledger = PrivacyLedger(configs[site].state_dir)
        kinds = [r["kind"] for r in ledger.releases("heart_failure") if r.get("run_id") == doc["run_id"]]
        assert kinds.count("train") == 3 + 1 and kinds.count("eval") == 3 + 2 + 1, kinds  # the plan's releases
        spent = epsilon_of(run_spent(ledger, "heart_failure", doc["run_id"]), delta=1e-5, accountant="rdp")
        assert abs(privacy["planned_epsilon"][site] - spent) < 1e-6
        assert abs(doc["epsilon"][site] - spent) < 1e-6
    err = capsys.readouterr().err
    assert "privacy plan: no total_epsilon; ε at the end of the run per site at δ = 1e-05 (rdp accountant)" in err
    for site in sites:
        assert f"-> ε = {privacy['planned_epsilon'][site]:.3f}" in err
    stored = StateStore(state)
    try:
        assert stored.run(doc["run_id"])["result"]["privacy"]["planned_epsilon"] == privacy["planned_epsilon"]
    finally:
        stored.close()
