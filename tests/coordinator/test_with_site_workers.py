"""The coordinator with real site workers (Opacus DP training on the real heart-failure records)."""

from __future__ import annotations

import pytest

from coordinator.audit import audit_run
from coordinator.run import Coordinator
from coordinator.state import StateStore
from tests.site_worker.support import experiment_dict, running_hospitals


@pytest.fixture
def three_hospitals(tmp_path):
    policy = {"max_epsilon": 100.0}
    with running_hospitals(tmp_path, {f"hosp-{i}": policy for i in (1, 2, 3)}, url_prefix="coord-sw") as running:
        bus, signer, state, fed, sites = running
        yield bus, signer, state, fed, [sid for sid, _ in sites.values()]


@pytest.mark.slow
def test_fedavg_with_real_site_workers_reports_metrics_epsilon_and_audits(three_hospitals):
    bus, signer, state, fed, sites = three_hospitals
    exp = experiment_dict(**{"training.epochs": 1, "training.rounds": 2, "federated.parameters.fraction_eval": 0.0})
    coord = Coordinator(exp, bus=bus, state_dir=state, signer=signer, federation=fed, progress=False)
    result = coord.run()
    assert result.ok, result.reason
    doc = result.to_json()
    assert doc["sites"] == sorted(sites)
    assert [r["replies"] for r in doc["rounds"]] == [3, 3]
    # The sites release DP metrics (policy default): a noisy loss sum below zero is released as 0, never negative.
    assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["loss"] < float("inf") for r in doc["rounds"])
    assert set(doc["final"]["per_site"]) == set(sites)
    assert sum(m["n_test"] for m in doc["final"]["per_site"].values()) > 0
    # Under DP the union AUC is not shown (no accounted union histogram); each figure shown has its interval.
    assert doc["final"]["auc"] is None
    for block in doc["final"]["per_site"].values():
        for name in ("accuracy", "sensitivity", "specificity"):
            if block.get(name) is not None:
                lo, hi = block["ci"][name]
                assert 0.0 <= lo <= hi <= 1.0
    assert all(e is not None and e > 0 for e in doc["epsilon"].values())  # Opacus accounting reported per site
    assert doc["rejected"] == []
    assert audit_run(StateStore(state), result.run_id).ok
