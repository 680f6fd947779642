"""A whole run's privacy budget: planned = spent, retries and late joins stay within it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from protocol.config import load_experiment
from site_worker.run_budget import BudgetExhausted, RunLedger, noise_for_task, plan_run

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


def _run(exp, ledger: RunLedger, rounds: list[int], n_train: int = 64, run_id: str = "run-1") -> list[float]:
    sigmas = []
    for i, r in enumerate(rounds):
        sigma, plan = noise_for_task(exp, ledger, run_id=run_id, dataset="hf", round=r, n_train=n_train, delta=1e-5,
                                     accountant="rdp")
        ledger.record(run_id, "hf", noise_multiplier=sigma, sample_rate=plan.sample_rate, steps=plan.round_steps,
                      task_id=f"task-{i}")
        sigmas.append(sigma)
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


def test_planned_epsilon_equals_spent_at_the_end(tmp_path):
    exp = _experiment(rounds=5)
    ledger = RunLedger(tmp_path)
    sigmas = _run(exp, ledger, rounds=[1, 2, 3, 4, 5])
    plan = plan_run(exp, n_train=64)
    assert len(set(sigmas)) == 1 and sigmas[0] == plan.noise_multiplier
    spent = ledger.spent("run-1", "hf", delta=1e-5)
    assert abs(spent - plan.planned_epsilon) < 1e-6
    assert abs(_opacus_epsilon(ledger.history("run-1", "hf")) - plan.planned_epsilon) < 1e-6


def test_a_retried_round_stays_within_the_budget(tmp_path):
    exp = _experiment(total=2.0, rounds=5)
    ledger = RunLedger(tmp_path)
    sigmas = _run(exp, ledger, rounds=[1, 2, 3, 3, 4, 5])  # round 3 trained twice
    spent = _opacus_epsilon(ledger.history("run-1", "hf"))
    assert spent <= 2.0 + 1e-9
    assert sigmas[3] > sigmas[0]  # the retry and what follows pay with more noise
    # without the recomputation the same six tasks at the planned noise would overspend
    naive = [(sigmas[0], 0.25, 6 * 2 * 4)]
    assert _opacus_epsilon(naive) > 2.0


def test_late_join_spends_the_budget_on_the_rounds_left(tmp_path):
    exp = _experiment(total=2.0, rounds=5)
    ledger = RunLedger(tmp_path)
    sigmas = _run(exp, ledger, rounds=[3, 4, 5])
    assert sigmas[0] < plan_run(exp, n_train=64).noise_multiplier  # fewer steps: less noise needed
    assert _opacus_epsilon(ledger.history("run-1", "hf")) <= 2.0 + 1e-9


def test_runs_are_kept_apart_and_a_spent_run_declines(tmp_path):
    exp = _experiment(total=1.0, rounds=2)
    ledger = RunLedger(tmp_path)
    # Someone spent far more than this run's total at round 1 (e.g. an older, looser site):
    ledger.record("run-1", "hf", noise_multiplier=0.3, sample_rate=0.25, steps=100, task_id="t0")
    with pytest.raises(BudgetExhausted):
        noise_for_task(exp, ledger, run_id="run-1", dataset="hf", round=2, n_train=64, delta=1e-5, accountant="rdp")
    # another run id starts from nothing
    sigma, _ = noise_for_task(exp, ledger, run_id="run-2", dataset="hf", round=1, n_train=64, delta=1e-5,
                              accountant="rdp")
    assert math.isfinite(sigma) and sigma > 0
    # a redelivered task is counted once
    ledger.record("run-2", "hf", noise_multiplier=sigma, sample_rate=0.25, steps=8, task_id="same")
    ledger.record("run-2", "hf", noise_multiplier=sigma, sample_rate=0.25, steps=8, task_id="same")
    assert ledger.history("run-2", "hf") == [(sigma, 0.25, 8)]
    assert not any("run-" in p.name for p in ledger.dir.iterdir())  # file names are hashes, not wire strings


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
        assert got["rows"] == rows and got["n_train"] == rows - round(rows * 0.2)
        want = plan_run(exp, n_train=got["n_train"])
        assert got["planned_epsilon"] == pytest.approx(want.planned_epsilon, abs=1e-12) and got["planned_epsilon"] <= 8.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"site-1": "many"}))
    res = CliRunner().invoke(app, ["config", "validate", str(ROOT / "examples" / "heart_failure.json"),
                                   "--catalogue", str(bad)])
    assert res.exit_code == 2 and "site-1" in res.output
