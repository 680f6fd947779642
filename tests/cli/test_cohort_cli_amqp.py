"""``fedbus coordinator cohort EXPERIMENT.json`` over a live federation: two site processes
(``fedbus site run``) on RabbitMQ, each with its own policy, answer the CLI's StatsTask.

Oracles: pandas on each site's own file (the announced rows), each site's ledger on disk (one
``stats`` release at its policy's σ), Opacus' RDP accountant (the ε the site reports), and the
pooled column as the sum of the released ones (noise variances add).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
from opacus.accountants import RDPAccountant

from coordinator.state import StateStore
from protocol.signing import generate_keypair
from protocol.transport import open_bus
from protocol.transport.base import Topology
from tests.site_worker.support import heart_failure_csv, site_toml
from tests.site_worker.test_worker_process import SiteProcess

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "heart_failure.json"


def test_coordinator_cohort_asks_live_sites_each_under_its_own_policy(tmp_path, amqp_url):
    fed = f"fed-{uuid.uuid4().hex[:8]}"
    kdir = tmp_path / "keys"
    ckey, cpub = generate_keypair("coordinator", kdir)
    state = tmp_path / "coord"
    store = StateStore(state)
    data = pd.read_csv(heart_failure_csv(tmp_path / "hf.csv"))
    sigma = {0: 2.0, 1: 3.0}  # the default, and another site's own stats_noise_multiplier
    ids, sites = [], []
    bus = open_bus(amqp_url)
    try:
        parts = (data.iloc[:150], data.iloc[150:])
        for i, part in enumerate(parts):
            sid = f"hosp-{i + 1}-{uuid.uuid4().hex[:6]}"
            skey, spub = generate_keypair(sid, kdir)
            store.enroll(sid, spub.read_bytes())
            sdir = tmp_path / sid
            sdir.mkdir()
            part.to_csv(sdir / "hf.csv", index=False)
            ids.append(sid)
            keys = type("K", (), {"site_key": skey, "coordinator_pub": cpub})
            sites.append(SiteProcess(site_toml(sdir, site_id=sid, federation=fed, broker_url=amqp_url, keys=keys,
                                               datasets={"heart_failure": {"path": str(sdir / "hf.csv"),
                                                                           "target": "DEATH_EVENT"}},
                                               policy={"stats_noise_multiplier": sigma[i]})))
        bus.declare(Topology(sites=ids, federations=[fed]))  # `fedbus broker provision` in production
        for p in sites:
            p.wait_for("site_started", timeout=120)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run([sys.executable, "-m", "fedbus.cli", "coordinator", "cohort", str(EXAMPLE), "--broker", amqp_url,
                            "--state", str(state), "--key", str(ckey), "--federation", fed, "--json", "--timeout", "120"],
                           capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        doc = json.loads(r.stdout)
    finally:
        for p in sites:
            p.terminate()
        bus.close()
    assert sorted(doc["sites"]) == sorted(ids)
    for i, sid in enumerate(ids):
        v = doc["sites"][sid]
        assert v["status"] == "released" and v["mode"] == "dp" and v["n"] == len(parts[i])
        ledger = json.loads(next((tmp_path / sid / "state").rglob("heart_failure.json")).read_text())
        assert [(x["kind"], x["entries"]) for x in ledger["releases"]] == [("stats", [[sigma[i], 1.0, 1]])]
        acc = RDPAccountant()
        acc.step(noise_multiplier=sigma[i], sample_rate=1.0)
        assert v["epsilon"] == pytest.approx(acc.get_epsilon(delta=v["delta"]), rel=1e-9)
    assert doc["pooled"]["n"] == len(data)
    assert doc["pooled"]["noise_sd"] == pytest.approx(sum(doc["sites"][s]["noise_sd"] ** 2 for s in ids) ** 0.5)
    assert [p.name for p in (state / "cohorts").iterdir()] == [f"{doc['cohort_id']}.json"]
    assert f"cohort {doc['cohort_id']}: heart_failure" in r.stderr
