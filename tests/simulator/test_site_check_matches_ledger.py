"""``site check``'s ε for a run equals the site's ledger after the run (issue 20, class 8).

It used to count rounds × (steps + one metrics release) with its own arithmetic (ε 4.36 where
the ledger ended at 6.36) and to fail an assertion on every ``total_epsilon`` experiment. Now
it asks ``protocol.privacy_plan.site_run_plan``, the plan the site runs. The run: examples/heart_failure.json
(``total_epsilon``) over two simulated sites; each site's check is taken on a copy of its state
without the ledger (as before the run: same split secret, so the same training rows).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from fedbus.site_check import _check_experiment
from protocol.config import load_experiment
from site_worker.config import load_site_config
from site_worker.ledger import PrivacyLedger

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_site_check_epsilon_is_the_ledgers_after_a_total_epsilon_run(tmp_path, monkeypatch):
    from simulator import workspace
    from simulator.run import simulate

    real = workspace.site_toml
    # DP metrics (a hospital's default), so the run's metrics, test and final releases are charged too
    monkeypatch.setattr(workspace, "site_toml", lambda **kw: real(**kw).replace('metrics = "exact"', 'metrics = "dp"'))

    doc = json.loads((ROOT / "examples" / "heart_failure.json").read_text())
    doc["training"]["rounds"] = 2
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(doc))
    assert load_experiment(path).training.dp.total_epsilon == 8.0
    result = simulate(path, sites=2, progress=False, seed=3, keep_work=True)
    assert result["status"] == "completed", result.get("error")
    sites = sorted((Path(result["work_dir"]) / "sites").iterdir())
    assert len(sites) == 2
    for home in sites:
        cfg = load_site_config(home / "site.toml")
        before = tmp_path / "before" / home.name
        shutil.copytree(cfg.state_dir, before, ignore=shutil.ignore_patterns("privacy"))
        checks = {c.name: c for c in _check_experiment(replace(cfg, state_dir=before), path)}
        assert checks["privacy"].ok, checks["privacy"].detail
        line = checks["privacy"].detail
        planned = float(re.search(r"cost ε ([0-9.e+-]+)", line).group(1))
        delta = float(re.search(r"at δ ([0-9.e+-]+)", line).group(1))
        spent = PrivacyLedger(cfg.state_dir).spent("heart_failure", delta=delta, accountant=cfg.policy.accountant)
        assert spent > 0
        kinds = {r["kind"] for r in PrivacyLedger(cfg.state_dir).releases("heart_failure")}
        assert cfg.policy.metrics == "dp" and len(kinds) > 1, kinds  # more than DP-SGD steps were charged
        assert planned == pytest.approx(spent, rel=1e-3), (home.name, line, spent)
