"""A whole run's privacy budget: planned = spent, retries and late joins stay within it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from protocol.config import load_experiment
from protocol.policy import SitePolicy
from protocol.privacy_plan import BudgetExhausted, plan_run
from site_worker.ledger import PrivacyLedger
from site_worker.run_budget import noise_for_task, run_spent

ROOT = Path(__file__).resolve().parents[2]


def _experiment(total: float = 2.0, rounds: int = 5, epochs: int = 2, batch_size: int = 16, personal: int = 0):
    doc = json.loads((ROOT / "examples" / "heart_failure.json").read_text())
    doc["training"].update(rounds=rounds, epochs=epochs, batch_size=batch_size)
    doc["training"]["optimizer"]["differential_privacy"] = {"total_epsilon": total, "delta": 1e-5, "max_grad_norm": 1.0}
    if personal:
        doc["training"]["personalization"] = {"mode": "last_layer", "epochs": personal}
    return load_experiment(doc)


def _opacus_epsilon(history, delta=1e-5) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


def _release(ledger: PrivacyLedger, rid: str, entries, *, kind: str = "train", run_id: str = "run-1") -> None:
    ledger.reserve("hf", release_id=rid, kind=kind, entries=entries, delta=1e-5, accountant="rdp",
                   max_epsilon=None, run_id=run_id)
    ledger.commit("hf", rid)


def _run(exp, ledger: PrivacyLedger, rounds: list[int], n_train: int = 64, run_id: str = "run-1",
         policy: SitePolicy | None = None) -> list[float]:
    """Play the site's releases of a run: per round a training task (steps + its metrics) and an
    evaluation, then the final test evaluation; returns the noise of each training task."""
    sigmas = []
    plan = plan_run(exp, n_train=n_train, policy=policy)
    metrics = list(plan.per_round_fixed[:1])
    for i, r in enumerate(rounds):
        sigma = noise_for_task(exp, ledger, run_id=run_id, dataset="hf", round=r, n_train=n_train, delta=1e-5,
                               accountant="rdp", policy=policy)
        _release(ledger, f"task-{i}", [(sigma, plan.sample_rate, plan.round_steps), *metrics], run_id=run_id)
        if len(plan.per_round_fixed) > 1:
            _release(ledger, f"eval-{i}", metrics, kind="eval", run_id=run_id)
        every = exp.federated.test_every
        if every and r % every == 0 and r < plan.rounds:  # federated.test_every: a test release after the round
            _release(ledger, f"test-{i}", metrics, kind="eval", run_id=run_id)
        sigmas.append(sigma)
    if plan.final_fixed:
        _release(ledger, "final", list(plan.final_fixed), kind="eval", run_id=run_id)
    return sigmas


def test_plan_steps_and_noise_from_the_sites_own_rows(tmp_path):
    exp = _experiment(total=2.0, rounds=5, epochs=2, batch_size=16, personal=3)
    small, large = plan_run(exp, n_train=64), plan_run(exp, n_train=640)
    assert (small.steps_per_epoch, small.sample_rate) == (4, 0.25)
    assert small.total_steps == 5 * 2 * 4 + 3 * 4
    # more rows: smaller sample rate, so less noise for the same total
    assert large.noise_multiplier < small.noise_multiplier
    for p in (small, large):
        assert p.planned_epsilon <= 2.0
        assert p.planned_epsilon == pytest.approx(2.0, abs=1e-2)  # Opacus' search tolerance
        # the plan's ε is Opacus' own accountant's
        assert p.planned_epsilon == pytest.approx(_opacus_epsilon([(p.noise_multiplier, p.sample_rate, p.total_steps)]),
                                                  abs=1e-9)


@pytest.mark.parametrize("metrics", ["exact", "dp"])
def test_planned_epsilon_equals_spent_at_the_end(tmp_path, metrics):
    """With DP metrics (σ = 5 per release, the site default) every release of the run is in the plan."""
    exp = _experiment(total=4.0, rounds=5)
    policy = SitePolicy(metrics=metrics)
    ledger = PrivacyLedger(tmp_path)
    sigmas = _run(exp, ledger, rounds=[1, 2, 3, 4, 5], policy=policy)
    plan = plan_run(exp, n_train=64, policy=policy)
    assert len(set(sigmas)) == 1 and sigmas[0] == plan.noise_multiplier
    spent = _opacus_epsilon(run_spent(ledger, "hf", "run-1"))
    assert abs(spent - plan.planned_epsilon) < 1e-6 and spent <= 4.0
    if metrics == "dp":  # the metrics releases cost budget, so training gets more noise
        assert plan.noise_multiplier > plan_run(exp, n_train=64, policy=SitePolicy(metrics="exact")).noise_multiplier


def test_periodic_test_evaluations_are_in_the_plan_and_in_each_tasks_noise(tmp_path):
    doc = json.loads((ROOT / "examples" / "heart_failure.json").read_text())
    doc["training"].update(rounds=5, epochs=2, batch_size=16)
    doc["training"]["optimizer"]["differential_privacy"] = {"total_epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0}
    doc["federated"]["test_every"] = 2  # test releases after rounds 2 and 4 (round 5's is the final one)
    exp = load_experiment(doc)
    policy = SitePolicy(metrics="dp")
    ledger = PrivacyLedger(tmp_path)
    sigmas = _run(exp, ledger, rounds=[1, 2, 3, 4, 5], policy=policy)
    plan = plan_run(exp, n_train=64, policy=policy)
    assert len(plan.test_fixed) == 2 and set(sigmas) == {plan.noise_multiplier}
    spent = _opacus_epsilon(run_spent(ledger, "hf", "run-1"))
    assert abs(spent - plan.planned_epsilon) < 1e-6 and spent <= 4.0 + 1e-9
    doc["federated"]["test_every"] = 0
    assert plan.noise_multiplier > plan_run(load_experiment(doc), n_train=64, policy=policy).noise_multiplier


def test_config_validate_plans_a_noise_multiplier_experiment(tmp_path):
    from typer.testing import CliRunner

    from fedbus.cli import app

    doc = json.loads((ROOT / "examples" / "heart_failure.json").read_text())
    doc["training"]["optimizer"]["differential_privacy"] = {"noise_multiplier": 1.2, "delta": 1e-5,
                                                            "max_grad_norm": 1.0}
    doc["training"]["batch_size"] = 16
    (tmp_path / "exp.json").write_text(json.dumps(doc))
    (tmp_path / "rows.json").write_text(json.dumps({"site-1": 100}))
    args = ["config", "validate", str(tmp_path / "exp.json"), "--catalogue", str(tmp_path / "rows.json")]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout.strip().splitlines()[-1])["privacy_plan"]["sites"]["site-1"]
    want = plan_run(load_experiment(doc), n_train=64, policy=SitePolicy())
    assert got["mode"] == "noise_multiplier" and got["noise_multiplier"] == 1.2
    assert got["planned_epsilon"] == pytest.approx(want.planned_epsilon, abs=1e-12)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "privacy plan: no total_epsilon; ε at the end of the run per site at δ = 1e-05" in res.output
    assert f"site-1: 64 training rows, {want.total_steps} DP-SGD steps at sample rate 0.25, noise σ = 1.200 -> " \
           f"ε = {want.planned_epsilon:.3f}" in res.output


def test_a_retried_round_stays_within_the_budget(tmp_path):
    exp = _experiment(total=2.0, rounds=5)
    ledger = PrivacyLedger(tmp_path)
    sigmas = _run(exp, ledger, rounds=[1, 2, 3, 3, 4, 5], policy=SitePolicy(metrics="exact"))  # round 3 twice
    spent = _opacus_epsilon(run_spent(ledger, "hf", "run-1"))
    assert spent <= 2.0 + 1e-9
    assert sigmas[3] > sigmas[0]  # the retry and what follows pay with more noise
    # without the recomputation the same six tasks at the planned noise would overspend
    naive = [(sigmas[0], 0.25, 6 * 2 * 4)]
    assert _opacus_epsilon(naive) > 2.0


def test_late_join_spends_the_budget_on_the_rounds_left(tmp_path):
    exp = _experiment(total=2.0, rounds=5)
    ledger = PrivacyLedger(tmp_path)
    sigmas = _run(exp, ledger, rounds=[3, 4, 5])
    assert sigmas[0] < plan_run(exp, n_train=64).noise_multiplier  # fewer steps: less noise needed
    assert _opacus_epsilon(run_spent(ledger, "hf", "run-1")) <= 2.0 + 1e-9


def test_runs_are_kept_apart_and_a_spent_run_declines(tmp_path):
    exp = _experiment(total=1.0, rounds=2)
    ledger = PrivacyLedger(tmp_path)
    # This run already released far more than its total at round 1 (e.g. an older, looser version):
    _release(ledger, "t0", [(0.3, 0.25, 100)])
    with pytest.raises(BudgetExhausted):
        noise_for_task(exp, ledger, run_id="run-1", dataset="hf", round=2, n_train=64, delta=1e-5, accountant="rdp")
    # another run id starts from nothing (the site's own max_epsilon still caps the dataset as a whole)
    sigma = noise_for_task(exp, ledger, run_id="run-2", dataset="hf", round=1, n_train=64, delta=1e-5,
                           accountant="rdp")
    assert math.isfinite(sigma) and sigma == plan_run(exp, n_train=64).noise_multiplier


def test_config_validate_shows_the_plan_from_announced_rows(tmp_path):
    from typer.testing import CliRunner

    from fedbus.cli import app

    catalogue = tmp_path / "rows.json"
    catalogue.write_text(json.dumps({"site-1": 100, "site-2": {"rows": 400}}))
    res = CliRunner().invoke(app, ["config", "validate", str(ROOT / "examples" / "heart_failure.json"),
                                   "--catalogue", str(catalogue), "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout.strip().splitlines()[-1])["privacy_plan"]
    exp = load_experiment(ROOT / "examples" / "heart_failure.json")
    assert plan["delta"] == 1e-5 and plan["total_epsilon"] == 8.0
    for site, rows in (("site-1", 100), ("site-2", 400)):
        got = plan["sites"][site]
        # expected training rows: 80 % outside the fixed test split, 80 % of those outside validation
        assert got["rows"] == rows and got["n_train"] == {100: 64, 400: 256}[rows]
        want = plan_run(exp, n_train=got["n_train"], policy=SitePolicy())  # site defaults: DP metrics
        assert got["planned_epsilon"] == pytest.approx(want.planned_epsilon, abs=1e-12) and got["planned_epsilon"] <= 8.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"site-1": "many"}))
    res = CliRunner().invoke(app, ["config", "validate", str(ROOT / "examples" / "heart_failure.json"),
                                   "--catalogue", str(bad)])
    assert res.exit_code == 2 and "site-1" in res.output
