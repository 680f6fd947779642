"""The coordinator with real site workers (Opacus DP training on the real heart-failure records)."""

from __future__ import annotations

import uuid

import pandas as pd
import pytest

from coordinator.audit import audit_run
from coordinator.run import Coordinator
from coordinator.state import StateStore
from protocol.signing import Signer, generate_keypair
from protocol.transport import open_bus
from protocol.transport.base import Topology
from site_worker.daemon import SiteWorker
from tests.site_worker.support import enrolled_hospital, experiment_dict, heart_failure_csv


@pytest.fixture
def three_hospitals(tmp_path):
    url = f"memory://coord-sw-{uuid.uuid4().hex[:8]}"
    fed = f"fed-{uuid.uuid4().hex[:8]}"
    ckey, cpub = generate_keypair("coordinator", tmp_path / "keys")
    state = tmp_path / "coord"
    store = StateStore(state)
    data = pd.read_csv(heart_failure_csv(tmp_path / "hf.csv"))
    sites, workers = [], []
    for i, part in enumerate((data.iloc[0:100], data.iloc[100:200], data.iloc[200:])):
        sid = f"hosp-{i + 1}-{uuid.uuid4().hex[:6]}"
        cfg = enrolled_hospital(tmp_path, part, site_id=sid, store=store, federation=fed, broker_url=url,
                                coordinator_pub=cpub, policy={"max_epsilon": 100.0})
        sites.append(sid)
        workers.append(SiteWorker(cfg, bus=open_bus(url)))
    bus = open_bus(url)
    bus.declare(Topology(sites=sites, federations=[fed]))
    for w in workers:
        w.start()
    yield bus, Signer.from_file(ckey), state, fed, sites
    for w in workers:
        w.stop(grace_s=2)
    bus.close()


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
    assert 0.0 <= doc["final"]["auc"] <= 1.0
    assert all(e is not None and e > 0 for e in doc["epsilon"].values())  # Opacus accounting reported per site
    assert doc["rejected"] == []
    assert audit_run(StateStore(state), result.run_id).ok
